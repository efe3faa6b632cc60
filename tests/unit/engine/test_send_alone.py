"""Device.send_alone, the loop's way for a packet read alone from TUN, against send_packet.

Two wires made alike (same seeds, one clock) live through the same events; on one, node a
sends every packet with send_alone where it takes it (send_packet where it declines), on the
other always with send_packet. Every datagram that crosses, every packet delivered, the
counters, the timers and the keypairs' counters must be the same on both at every step: the
shortcut is only shorter, never different.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from podwire.agent.engine import actions as actions_mod
from podwire.agent.engine import timers as timers_mod
from podwire.agent.engine.counters import Drop

A_ADDR4, B_ADDR4 = "10.0.1.1", "10.0.2.1"
A_ADDR6, B_ADDR6 = "fd00:1::1", "fd00:2::1"
Wire = Any
# Small message limits, so a rekey by count comes within a test's reach.
SMALL = timers_mod.ProtocolTimers(rekey_after_messages=12, reject_after_messages=20)


def _send_alone_first(wire: Wire, packet: bytes) -> bool:
    """a sends packet the loop's way; True if send_alone took it."""
    a = wire.a
    now = wire.clock.monotonic()
    sealed = a.device.send_alone(packet, now)
    if sealed is None:
        wire.run(a, a.device.send_packet(packet, now))
        return False
    wire.run(a, [actions_mod.SendDatagram(*sealed)])
    return True


_events = st.lists(
    st.one_of(
        st.tuples(st.just("a4"), st.integers(0, 1400)),
        st.tuples(st.just("a6"), st.integers(0, 1380)),
        st.tuples(st.just("a_nowhere"), st.just(0)),
        st.tuples(st.just("b4"), st.integers(0, 1400)),
        st.tuples(st.just("wait"), st.sampled_from([0.05, 1.0, 10.0, 30.0, 119.0, 181.0])),
        st.tuples(st.just("down"), st.booleans()),
    ),
    max_size=40,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(events=_events, small=st.booleans(), persistent=st.sampled_from([0, 5]))
# An answer between two packets: the second re-arms new_handshake_at (on_data_sent).
@example(events=[("a4", 10), ("b4", 10), ("a4", 10), ("wait", 10.0), ("a4", 0)], small=False,
         persistent=0)  # fmt: skip
# The packet that reaches rekey_after_messages: send_packet's, with its initiation.
@example(events=[("a4", 1)] * 12 + [("wait", 10.0), ("a4", 2), ("a6", 3)], small=True,
         persistent=5)  # fmt: skip
# A lost answer, then two minutes: the initiator's key is old enough to rekey.
@example(events=[("a4", 1), ("b4", 1), ("down", True), ("a4", 5), ("down", False),
                 ("wait", 119.0), ("a4", 2), ("wait", 1.0), ("a4", 3)], small=False,
         persistent=0)  # fmt: skip
def test_send_alone_changes_nothing_that_send_packet_would_not(
    twin_wires: Any, packets: Any, events: list[tuple[str, Any]], small: bool, persistent: int
) -> None:
    shortcut, plain = twin_wires(SMALL if small else None, persistent)

    def happen(wire: Wire, kind: str, value: Any) -> None:
        if kind in ("a4", "a6", "a_nowhere"):
            if kind == "a4":
                packet = packets.ipv4(A_ADDR4, B_ADDR4, bytes(value))
            elif kind == "a6":
                packet = packets.ipv6(A_ADDR6, B_ADDR6, bytes(value))
            else:
                packet = packets.ipv4(A_ADDR4, "10.9.9.9", b"x")  # no route
            if wire is shortcut:
                _send_alone_first(wire, packet)
            else:
                wire.send(wire.a, packet)
        elif kind == "b4":
            wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, bytes(value)))
        else:
            wire.up = not value

    shortcut.live_through_with(plain, events, happen)


def test_send_alone_takes_an_established_sessions_packet(wire: Wire, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))  # the handshake
    assert wire.b.delivered == [packets.ipv4(A_ADDR4, B_ADDR4, b"first")]
    for body in (b"second", b"third"):
        assert _send_alone_first(wire, packets.ipv4(A_ADDR4, B_ADDR4, body))
    assert wire.b.delivered[1:] == [
        packets.ipv4(A_ADDR4, B_ADDR4, b"second"),
        packets.ipv4(A_ADDR4, B_ADDR4, b"third"),
    ]
    assert wire.a.device.counters.transport_sent == 3


def test_send_alone_declines_before_a_session_and_changes_nothing(wire: Wire, packets: Any) -> None:
    before = wire.state()
    assert wire.a.device.send_alone(packets.ipv4(A_ADDR4, B_ADDR4, b"x"), 1000.0) is None
    assert wire.state() == before


def test_send_alone_declines_what_waits_behind_staged_packets(wire: Wire, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    peer_b = next(iter(wire.a.device.peers.values()))
    peer_b.stage(packets.ipv4(A_ADDR4, B_ADDR4, b"queued"))
    # Taking the next packet alone would overtake the one queued before it.
    assert wire.a.device.send_alone(packets.ipv4(A_ADDR4, B_ADDR4, b"next"), 1000.0) is None


@pytest.mark.parametrize("limit", ["rekey_after_messages", "rekey_after_time"])
def test_send_alone_leaves_the_rekey_to_send_packet(
    wire_factory: Any, packets: Any, limit: str
) -> None:
    config = SMALL if limit == "rekey_after_messages" else timers_mod.ProtocolTimers()
    wire = wire_factory(timers=config)
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    if limit == "rekey_after_messages":
        for _ in range(config.rekey_after_messages - 1):
            assert _send_alone_first(wire, packets.ipv4(A_ADDR4, B_ADDR4, b"more"))
        wire.advance(config.rekey_timeout + 1)  # past the first handshake's rekey timeout
    else:
        wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, b"reply"))
        wire.advance(config.rekey_after_time, step=5.0)
    initiations = len(wire.sent_by("a", 1))
    # This one would start a handshake once sent: send_packet's to do, and it does.
    assert not _send_alone_first(wire, packets.ipv4(A_ADDR4, B_ADDR4, b"last"))
    assert len(wire.sent_by("a", 1)) == initiations + 1
    assert wire.b.delivered[-1] == packets.ipv4(A_ADDR4, B_ADDR4, b"last")


def test_send_alone_leaves_drops_to_send_packet(wire: Wire, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    nowhere = packets.ipv4(A_ADDR4, "10.9.9.9", b"x")
    assert not _send_alone_first(wire, nowhere)
    assert wire.a.device.counters.drops[Drop.NO_ROUTE] == 1


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    packet=st.one_of(
        st.binary(max_size=80),
        # Version nibbles that pass the first test, with anything behind them.
        st.builds(lambda first, rest: bytes([first]) + rest, st.sampled_from([0x45, 0x4F, 0x60, 0x6F]),
                  st.binary(max_size=60)),
    ),
    established=st.booleans(),
)  # fmt: skip
def test_whatever_a_pod_sends_into_the_tunnel_never_raises(
    wire: Wire, packets: Any, packet: bytes, established: bool
) -> None:
    """A pod may write any bytes a raw socket lets it into the tunnel's route; what the kernel
    hands the TUN device reaches send_alone and then send_packet. Neither raises."""
    if established:
        wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    now = wire.clock.monotonic()
    if wire.a.device.send_alone(packet, now) is None:
        wire.run(wire.a, wire.a.device.send_packet(packet, now))
    assert wire.a.device.counters.drops[Drop.INTERNAL_ERROR] == 0
