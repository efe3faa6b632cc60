"""send_packets, the batch the I/O loop hands over (the segments of a TSO burst): the same
datagrams, counters and timers as sending the packets one by one, and before a session the
batch waits staged behind one initiation instead of overflowing."""

from __future__ import annotations

from typing import Any

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
