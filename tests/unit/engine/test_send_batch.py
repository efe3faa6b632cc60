"""send_packets and receive_datagrams, the batches the I/O loop hands over (the segments of a
TSO burst, a GRO train): the same datagrams, packets, counters and timers as one by one, and
before a session a burst waits staged behind one initiation instead of overflowing."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from podwire.agent.engine import constants, peer
from podwire.agent.engine.counters import Drop

A4, B4 = "10.0.1.1", "10.0.2.1"
A6, B6 = "fd00:1::1", "fd00:2::1"


def _burst(packets: Any, n: int) -> list[bytes]:
    return [
        packets.ipv4(A4, B4, bytes([i]) * (1000 + i)) if i % 3 else packets.ipv6(A6, B6, b"6" * i)
        for i in range(n)
    ]


def test_a_burst_arrives_in_order_as_one_by_one_would(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))  # the handshake
    burst = [*_burst(packets, 150), packets.ipv4(A4, "10.9.9.9", b"nowhere")]
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    counter_before = peer_b.current.send_counter

    wire.run(wire.a, wire.a.device.send_packets(burst, wire.clock.monotonic()))

    assert wire.b.delivered[1:] == burst[:-1]
    assert peer_b.current.send_counter == counter_before + 150
    assert wire.a.device.counters.transport_sent == 1 + 150
    assert wire.a.device.counters.drops[Drop.NO_ROUTE] == 1
    assert not peer_b.staged
    # The timers heard of the data: an answer is expected, no keepalive is owed.
    assert peer_b.timers.new_handshake_at is not None
    assert peer_b.timers.send_keepalive_at is None


def test_before_a_session_a_burst_waits_behind_one_initiation(wire: Any, packets: Any) -> None:
    burst = _burst(packets, peer.MAX_STAGED_PACKETS - 1)
    actions = wire.a.device.send_packets(burst, wire.clock.monotonic())

    initiations = [a for a in actions if a.data[0] == constants.MESSAGE_INITIATION]
    assert len(actions) == len(initiations) == 1
    assert wire.a.device.counters.drops[Drop.STAGED_OVERFLOW] == 0
    wire.run(wire.a, actions)
    assert wire.b.delivered == burst


def test_a_burst_larger_than_the_stage_keeps_its_newest(wire: Any, packets: Any) -> None:
    burst = _burst(packets, peer.MAX_STAGED_PACKETS + 10)
    wire.a.device.send_packets(burst, wire.clock.monotonic())
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    assert list(peer_b.staged) == burst[10:]
    assert wire.a.device.counters.drops[Drop.STAGED_OVERFLOW] == 10


def _timer_state(wire: Any) -> dict[str, Any]:
    t = wire.b.device.peers[wire.a.device.public_key].timers
    return {k: v for k, v in vars(t).items() if not k.startswith("_") and k != "config"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kinds=st.lists(
        st.sampled_from(["data", "keepalive", "replay", "garbage", "short", "handshake"]),
        max_size=12,
    ),
    gap=st.sampled_from([0.0, 1.0, 11.0, 25.0]),
)
@example(kinds=["data", "data", "keepalive", "data"], gap=25.0)
@example(kinds=["data", "replay", "garbage", "handshake", "data"], gap=0.0)
def test_a_batch_of_datagrams_ends_as_one_by_one_ends(
    wire_factory: Any, packets: Any, kinds: list[str], gap: float
) -> None:
    """Two identical pairs: b of one takes the datagrams one by one, b of the other as a
    batch; what is delivered and sent, the counters and b's timers come out the same."""
    one, batch = wire_factory(), wire_factory()
    for w in (one, batch):
        w.send(w.a, packets.ipv4(A4, B4, b"hello"))
    # The pairs share the test's clock: time passes once, both tick at every step.
    for _ in range(round(gap * 10)):
        one.clock.advance(0.1)
        one.tick()
        batch.tick()
    datagrams: list[tuple[bytes, Any]] = []
    first_data = None
    for i, kind in enumerate(kinds):
        if kind in ("data", "keepalive"):
            payload = [] if kind == "keepalive" else [packets.ipv4(A4, B4, bytes([i]) * 50)]
            for w in (one, batch):
                now = w.clock.monotonic()
                p = w.a.device.peers[w.b.device.public_key]
                sent = w.a.device.send_packets(payload, now) if payload else _keepalive(w, p, now)
            datagrams += [(s.data, one.a.endpoint) for s in sent]
            if first_data is None and sent:
                first_data = sent[0].data
        elif kind == "replay" and first_data is not None:
            datagrams.append((first_data, one.a.endpoint))
        elif kind == "garbage":
            datagrams.append((b"\x04\0\0\0" + bytes(40), one.a.endpoint))
        elif kind == "short":
            datagrams.append((b"\x04\0", one.a.endpoint))
        elif kind == "handshake":
            datagrams.append((b"\x01\0\0\0" + bytes(144), one.a.endpoint))
    now = one.clock.monotonic()
    singly = [
        action
        for data, src in datagrams
        for action in one.b.device.receive_datagram(data, src, now)
    ]
    together = batch.b.device.receive_datagrams(datagrams, now)

    assert [type(a).__name__ for a in together] == [type(a).__name__ for a in singly]
    assert [a.packet for a in together if hasattr(a, "packet")] == [
        a.packet for a in singly if hasattr(a, "packet")
    ]
    assert batch.b.device.counters.as_dict() == one.b.device.counters.as_dict()
    assert _timer_state(batch) == _timer_state(one)


def _keepalive(w: Any, p: Any, now: float) -> list[Any]:
    from podwire.agent.engine import send

    actions: list[Any] = []
    send.send_keepalive(w.a.device, p, now, actions)
    return actions


def test_every_packet_of_a_burst_is_routed_and_checked(wire: Any, packets: Any) -> None:
    """A burst that mixes good destinations with unrouted ones and the peer's own endpoint
    (a routing loop): each bad packet is dropped and counted, however many good ones to the
    same peer came before it, and the good ones arrive in order."""
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))  # the handshake
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    wire.a.device.allowed_ips.insert("192.0.2.0/24", peer_b)  # holds peer b's endpoint
    good = [packets.ipv4(A4, B4, bytes([i]) * 100) for i in range(4)]
    nowhere = packets.ipv4(A4, "10.9.9.9", b"nowhere")
    loop = packets.ipv4(A4, wire.b.endpoint[0], b"loop")
    burst = [good[0], nowhere, loop, good[1], nowhere, good[2], loop, good[3]]

    wire.run(wire.a, wire.a.device.send_packets(burst, wire.clock.monotonic()))

    assert wire.b.delivered[1:] == good
    drops = wire.a.device.counters.drops
    assert drops[Drop.NO_ROUTE] == 2
    assert drops[Drop.ROUTING_LOOP] == 2
    assert peer_b.routing_loops == 2


def test_every_packet_of_a_batch_received_has_its_source_checked(wire: Any, packets: Any) -> None:
    """Datagrams of one batch from one peer whose inner packets alternate between a source
    the peer may use and one it may not: each one from the wrong source is dropped, however
    many from a good source came before."""
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))  # the handshake
    good = [packets.ipv4(A4, B4, bytes([i]) * 100) for i in range(3)]
    spoofed = [packets.ipv4("10.0.7.7", B4, bytes([i]) * 90) for i in range(2)]
    spoofed6 = packets.ipv6("fd00:7::1", B6, b"6" * 50)
    burst = [good[0], spoofed[0], good[1], spoofed6, spoofed[1], good[2]]
    actions = wire.a.device.send_packets(burst, wire.clock.monotonic())
    datagrams = [(a.data, wire.a.endpoint) for a in actions]
    assert len(datagrams) == len(burst)
    before = list(wire.b.delivered)

    delivered = [
        x.packet
        for x in wire.b.device.receive_datagrams(datagrams, wire.clock.monotonic())
        if hasattr(x, "packet")
    ]

    assert wire.b.delivered == before
    assert delivered == good
    assert wire.b.device.counters.drops[Drop.BAD_SOURCE_ADDRESS] == 3
