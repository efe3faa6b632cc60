"""The steering program, run by the kernel: a real SO_REUSEPORT group (UdpBind.open) on an
ephemeral port, datagrams sent to it over loopback from chosen source addresses (all of
127.0.0.0/8 is loopback's, and ::1), and the socket each one lands on read back. No root:
attaching a reuseport program needs no privilege.

    senders 127.0.0.x / ::1  --lo-->  [budgeted | data | priority]  one port, one group
"""

from __future__ import annotations

import errno
import ipaddress
import random
import select
import socket
from collections.abc import Iterator

import pytest

from podwire.agent.engine import steer, udp

INITIATION = b"\x01\x00\x00\x00" + bytes(144)
RESPONSE = b"\x02\x00\x00\x00" + bytes(88)
COOKIE_REPLY = b"\x03\x00\x00\x00" + bytes(60)
TRANSPORT = b"\x04\x00\x00\x00" + bytes(28)
PEER = "127.0.0.2"
STRANGER = "127.0.0.3"


@pytest.fixture
def bind() -> Iterator[udp.UdpBind]:
    b = udp.UdpBind.open(0, offloads=False)
    assert b.steered, b.steer_off_reason
    yield b
    b.close()


def _landing(bind: udp.UdpBind, data: bytes, source: str) -> int | None:
    """The role of the socket the datagram from `source` lands on; None if it is lost."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    target = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_DGRAM) as sender:
        sender.bind((source, 0))
        sender.sendto(data, (target, bind.port))
    ready, _, _ = select.select(bind.sockets, [], [], 2)
    assert len(ready) <= 1
    if not ready:
        return None
    received, address = ready[0].recvfrom(2048)
    assert received == data and address[0].removeprefix("::ffff:") == source
    return bind.sockets.index(ready[0])


# The numbered table: what lands where, with PEER ("127.0.0.2" and "::1") a peer's endpoint.
CASES = [
    (1, TRANSPORT, STRANGER, steer.DATA),
    (2, TRANSPORT, PEER, steer.DATA),
    (3, INITIATION, PEER, steer.PRIORITY),
    (4, RESPONSE, PEER, steer.PRIORITY),
    (5, COOKIE_REPLY, PEER, steer.PRIORITY),
    (6, INITIATION, STRANGER, steer.BUDGETED),
    (7, RESPONSE, STRANGER, steer.BUDGETED),
    (8, b"\x01\x00\x00", PEER, steer.BUDGETED),  # too short to hold a type
    (9, b"", PEER, steer.BUDGETED),
    (10, b"\x05\x00\x00\x00" + bytes(40), PEER, steer.BUDGETED),  # no such type
    (11, b"\x01\x00\x00\x01" + bytes(144), PEER, steer.BUDGETED),  # reserved bytes set
    (12, b"\x04\x00\x01\x00" + bytes(28), STRANGER, steer.BUDGETED),
    (13, INITIATION, "::1", steer.PRIORITY),
    (14, TRANSPORT, "::1", steer.DATA),
    (15, b"\x09", "::1", steer.BUDGETED),
]


@pytest.mark.parametrize(
    ("number", "data", "source", "role"), CASES, ids=[str(c[0]) for c in CASES]
)
def test_each_datagram_lands_on_its_roles_socket(
    bind: udp.UdpBind, number: int, data: bytes, source: str, role: int
) -> None:
    assert bind.steer_sources({PEER, "::1", "198.51.100.7"})
    assert _landing(bind, data, source) == role, f"case {number}"


def test_the_program_follows_the_endpoints(bind: udp.UdpBind) -> None:
    assert _landing(bind, INITIATION, PEER) == steer.BUDGETED  # no endpoint yet
    assert bind.steer_sources({PEER})
    assert not bind.steer_sources({PEER})  # unchanged: not attached again
    assert _landing(bind, INITIATION, PEER) == steer.PRIORITY
    assert _landing(bind, INITIATION, "::1") == steer.BUDGETED
    # The peer roamed: its new address is the endpoint; the old one is nobody's.
    assert bind.steer_sources({STRANGER, "::1"})
    assert _landing(bind, INITIATION, PEER) == steer.BUDGETED
    assert _landing(bind, INITIATION, STRANGER) == steer.PRIORITY
    assert _landing(bind, INITIATION, "::1") == steer.PRIORITY
    # An endpoint written as an IPv4-mapped IPv6 address is the IPv4 address the header holds.
    assert bind.steer_sources({f"::ffff:{PEER}"})
    assert _landing(bind, INITIATION, PEER) == steer.PRIORITY


def test_the_programs_length_is_as_fitting_counts_it() -> None:
    v4 = [bytes([10, 0, 0, i]) for i in range(5)]
    v6 = [bytes(15) + bytes([i]) for i in range(3)]
    assert len(steer.program([], [])) == steer._FIXED_INSTRUCTIONS
    assert len(steer.program(v4, v6)) == steer._FIXED_INSTRUCTIONS + 2 * 5 + 9 * 3
    assert steer.fitting(v4 * 3000, v6) == ((v4 * 3000)[:2037], [])
    assert steer.fitting([], v6 * 1000) == ([], (v6 * 1000)[:452])


def test_the_kernel_agrees_with_a_naive_model_on_random_endpoints(bind: udp.UdpBind) -> None:
    rng = random.Random(11)
    for _ in range(3):
        endpoints = {f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                     for _ in range(rng.randrange(1, 300))}  # fmt: skip
        endpoints |= {str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(40)}
        if rng.random() < 0.5:
            endpoints.add("::1")
        bind.steer_sources(endpoints)
        probes = rng.sample(sorted(e for e in endpoints if "." in e), 10)
        probes += [f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                   for _ in range(10)] + ["::1"]  # fmt: skip
        for source in probes:
            data = rng.choice([INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT, b"\x07"])
            expected = (
                steer.DATA if data is TRANSPORT
                else steer.BUDGETED if data == b"\x07"
                else steer.PRIORITY if source in endpoints
                else steer.BUDGETED
            )  # fmt: skip
            assert _landing(bind, data, source) == expected, (source, data[:1])


def test_as_many_endpoints_as_fit_are_steered_and_the_kernel_takes_the_longest_program(
    bind: udp.UdpBind,
) -> None:
    v4 = [f"127.{i // 256}.{i % 256}.2" for i in range(3000)]  # PEER first
    v6 = [f"fd00::{i:x}" for i in range(600)]
    assert bind.steer_sources({*v4, *v6})
    assert not bind.steer_off_reason
    fitted_v4, fitted_v6 = steer.fitting(*steer.sources(v4 + v6))
    assert 2000 < len(fitted_v4) < len(v4) and fitted_v6 == []  # IPv4 first: 2 instructions
    assert bind.steered_sources == len(fitted_v4)
    assert len(steer.program(fitted_v4, fitted_v6)) == steer.MAX_INSTRUCTIONS
    # The lowest addresses fit; the rest take the budgeted socket.
    assert _landing(bind, INITIATION, PEER) == steer.PRIORITY
    assert _landing(bind, INITIATION, v4[len(fitted_v4) - 1]) == steer.PRIORITY
    assert _landing(bind, INITIATION, v4[len(fitted_v4)]) == steer.BUDGETED


def test_a_flood_overflows_the_budgeted_socket_only_and_its_drops_are_counted(
    bind: udp.UdpBind,
) -> None:
    assert bind.kernel_drops() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
        flooder.bind((STRANGER, 0))
        for _ in range(5000):
            flooder.sendto(INITIATION, ("127.0.0.1", bind.port))
    drops = bind.kernel_drops() or 0
    kept = 0
    assert bind.budgeted is not None
    while select.select([bind.budgeted], [], [], 0)[0]:
        bind.budgeted.recv(2048)
        kept += 1
    # Loopback loses nothing else: the kernel kept what the small buffer holds, dropped the rest.
    assert 0 < kept < 1000 and kept + drops == 5000
    # The data socket is untouched by it: a transport message lands and is read at once.
    assert _landing(bind, TRANSPORT, STRANGER) == steer.DATA


def test_a_port_held_by_another_reuseport_socket_is_refused_not_joined() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("::", 0))
        with pytest.raises(OSError) as refused:
            udp.UdpBind.open(holder.getsockname()[1], offloads=False).close()
    assert refused.value.errno == errno.EADDRINUSE


def test_a_refused_program_leaves_one_socket_that_works(monkeypatch: pytest.MonkeyPatch) -> None:
    # A program the kernel's checker refuses: its jump leaves the program.
    monkeypatch.setattr(steer, "program", lambda v4, v6: [(0x05, 0, 0, 10), (0x06, 0, 0, 0)])
    bind = udp.UdpBind.open(0, offloads=False)
    try:
        assert not bind.steered and len(bind.sockets) == 1 and bind.budgeted is None
        assert "refused the steering program" in bind.steer_off_reason
        assert not bind.steer_sources({PEER})
        assert "udp_steering" not in bind.offloads()
        for data in (INITIATION, TRANSPORT):
            assert _landing(bind, data, PEER) == 0
    finally:
        bind.close()


def test_without_steering_there_is_one_socket() -> None:
    bind = udp.UdpBind.open(0, offloads=False, steering=False)
    try:
        assert not bind.steered and len(bind.sockets) == 1 and not bind.steer_off_reason
        assert bind.kernel_drops() is None
    finally:
        bind.close()


def test_replies_leave_from_the_port_whichever_socket_sends(bind: udp.UdpBind) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
        peer.bind(("::1", 0))
        peer.settimeout(2)
        bind.send(b"hello", ("::1", peer.getsockname()[1]))
        data, address = peer.recvfrom(64)
    assert data == b"hello" and address[1] == bind.port
