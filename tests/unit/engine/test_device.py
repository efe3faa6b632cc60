"""Two Devices over an in-memory wire: ping, padding, roaming, the source-address check,
session confirmation, configuration, and fuzzing of what a peer can send."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podwire.agent.engine import actions, constants, counters
from podwire.agent.engine.counters import Drop

A4, B4, A6, B6 = "10.0.1.1", "10.0.2.1", "fd00:1::1", "fd00:2::1"


def test_ipv4_and_ipv6_ping_over_the_wire(wire: Any, packets: Any) -> None:
    ping = packets.ipv4(A4, B4, b"\x08\x00" + b"ping" * 5, protocol=1)
    wire.send(wire.a, ping)
    assert wire.b.delivered == [ping]
    pong = packets.ipv4(B4, A4, b"\x00\x00" + b"pong" * 5, protocol=1)
    wire.send(wire.b, pong)
    assert wire.a.delivered == [pong]

    ping6 = packets.ipv6(A6, B6, b"\x80\x00" + b"six" * 7, next_header=58)
    wire.send(wire.a, ping6)
    pong6 = packets.ipv6(B6, A6, b"\x81\x00" + b"xis" * 7, next_header=58)
    wire.send(wire.b, pong6)
    assert wire.b.delivered[-1] == ping6
    assert wire.a.delivered[-1] == pong6
    # One handshake served all of it; nothing went over the wire in clear.
    assert len(wire.sent_by("a", constants.MESSAGE_INITIATION)) == 1
    assert not any(b"ping" in s.data or b"six" in s.data for s in wire.log)


def test_the_handshake_sets_last_handshake_and_counts_bytes(wire: Any, packets: Any) -> None:
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    peer_a = wire.b.device.peers[wire.a.device.public_key]
    assert peer_b.last_handshake_wall is None
    wire.send(wire.a, packets.ipv4(A4, B4, b"x" * 100))
    assert peer_b.last_handshake_wall == wire.clock.wall()
    # The responder completes when the first data packet confirms the session.
    assert peer_a.last_handshake_wall == wire.clock.wall()
    a_sent = sum(len(s.data) for s in wire.sent_by("a"))
    b_sent = sum(len(s.data) for s in wire.sent_by("b"))
    assert (peer_b.tx_bytes, peer_b.rx_bytes) == (a_sent, b_sent)
    assert (peer_a.tx_bytes, peer_a.rx_bytes) == (b_sent, a_sent)
    assert a_sent == 148 + 16 + 128 + 16  # initiation + one 120-byte packet padded to 128


def test_padding_to_sixteen_but_never_beyond_the_mtu(wire: Any, packets: Any) -> None:
    wire.a.device.mtu = 1420
    for size in (21, 1419, 1420):
        packet = packets.ipv4(A4, B4, b"p" * (size - 20))
        wire.send(wire.a, packet)
        assert wire.b.delivered[-1] == packet  # padding trimmed using the IP header's length
    sizes = [len(s.data) for s in wire.sent_by("a", constants.MESSAGE_TRANSPORT)]
    assert sizes == [16 + 32 + 16, 16 + 1420 + 16, 16 + 1420 + 16]


def test_a_packet_without_a_route_is_dropped(wire: Any, packets: Any) -> None:
    assert wire.a.device.send_packet(packets.ipv4(A4, "10.9.9.9", b"x"), 1.0) == []
    assert wire.a.device.send_packet(b"\x00" * 30, 1.0) == []
    assert wire.a.device.counters.drops[Drop.NO_ROUTE] == 1
    assert wire.a.device.counters.drops[Drop.BAD_IP_PACKET] == 1


def test_the_responder_waits_for_confirmation_before_sending(wire: Any, packets: Any) -> None:
    # Lose a's confirming keepalive: b holds only an unconfirmed "next" keypair.
    wire.filter = lambda s: None if s.source == "a" and s.kind == 4 else s
    wire.send(wire.a, packets.ipv4(A4, B4, b"first"))
    peer_a = wire.b.device.peers[wire.a.device.public_key]
    assert peer_a.next is not None and peer_a.current is None

    reply = packets.ipv4(B4, A4, b"held")
    wire.send(wire.b, reply)
    assert wire.a.delivered == []
    assert not wire.sent_by("b", constants.MESSAGE_TRANSPORT)

    wire.filter = lambda s: s
    second = packets.ipv4(A4, B4, b"second")
    wire.send(wire.a, second)
    assert wire.b.delivered == [second]
    assert wire.a.delivered == [reply]  # confirmation released the held packet
    assert peer_a.current is not None and peer_a.next is None


def test_the_endpoint_roams_to_the_latest_authenticated_source(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    peer_a = wire.b.device.peers[wire.a.device.public_key]
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    assert peer_a.endpoint == wire.a.endpoint  # learnt from the handshake

    wire.b.endpoint = ("198.51.100.7", 4000)  # b moves
    wire.send(wire.b, packets.ipv4(B4, A4, b"moved"))
    assert peer_b.endpoint == ("198.51.100.7", 4000)
    wire.send(wire.a, packets.ipv4(A4, B4, b"follow"))
    assert wire.sent_by("a")[-1].endpoint == ("198.51.100.7", 4000)
    assert wire.b.delivered[-1] == packets.ipv4(A4, B4, b"follow")

    # A forged datagram from elsewhere, with a valid index but a bad tag, moves nothing.
    forged = bytearray(wire.sent_by("b", constants.MESSAGE_TRANSPORT)[-1].data)
    forged[-1] ^= 1
    assert wire.a.device.receive_datagram(bytes(forged), ("203.0.113.66", 1), 1000.0) == []
    assert peer_b.endpoint == ("198.51.100.7", 4000)
    assert wire.a.device.counters.drops[Drop.BAD_AEAD] == 1


def test_a_source_address_outside_the_peers_allowed_ips_is_dropped(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    spoofed = [
        packets.ipv4("10.0.1.7", A4, b"ok"),  # b's range is 10.0.2.0/24: 10.0.1.7 is a's
        packets.ipv4("10.0.2.7", A4, b"ok"),
        packets.ipv6("fd00:1::9", A6, b"ok"),
        packets.ipv6("fd00:2::9", A6, b"ok"),
    ]
    for packet in spoofed:
        wire.send(wire.b, packet)
    assert wire.a.delivered == [spoofed[1], spoofed[3]]
    assert wire.a.device.counters.drops[Drop.BAD_SOURCE_ADDRESS] == 2


def test_a_decrypted_non_ip_or_truncated_packet_is_dropped(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    good = packets.ipv4(B4, A4, b"abc")
    lying = good[:2] + (200).to_bytes(2, "big") + good[4:]  # claims more than it has
    peer_a = wire.b.device.peers[wire.a.device.public_key]
    # b encrypts whatever it is given once the route matches; a must check the inner packet.
    for payload in (lying, b"\x70" + good[1:]):
        peer_a.stage(payload)
        wire.run(wire.b, wire.b.device.tick(wire.clock.monotonic()))
        wire.run(wire.b, wire.b.device.send_packet(packets.ipv4(B4, A4, b"flush"), 1000.0))
    assert wire.a.delivered == [packets.ipv4(B4, A4, b"flush")] * 2
    assert wire.a.device.counters.drops[Drop.BAD_IP_PACKET] == 2


def test_a_replayed_transport_datagram_is_dropped(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"once"))
    datagram = wire.sent_by("a", constants.MESSAGE_TRANSPORT)[-1]
    replies = wire.b.device.receive_datagram(datagram.data, wire.a.endpoint, 1000.0)
    assert replies == []
    assert wire.b.device.counters.drops[Drop.REPLAYED] == 1
    assert len(wire.b.delivered) == 1


def test_peer_configuration_surface(wire: Any) -> None:
    dev = wire.a.device
    key = wire.b.device.public_key
    peer = dev.add_peer(key)
    assert dev.add_peer(key) is peer
    assert peer.preshared_key == bytes(32)
    peer.preshared_key = b"k" * 32
    assert peer.preshared_key == b"k" * 32
    with pytest.raises(ValueError):
        peer.preshared_key = b"short"
    with pytest.raises(AttributeError):
        peer.public_key = b"x" * 32
    dev.remove_all_peers()
    assert dev.peers == {} and len(dev.allowed_ips) == 0
    dev.set_private_key(bytes(32), now=wire.clock.monotonic())
    assert dev.private_key is None and dev.public_key is None


def test_a_removed_peer_is_unreachable_and_its_sessions_forgotten(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    old = wire.sent_by("a", constants.MESSAGE_TRANSPORT)[-1]
    wire.b.device.remove_peer(wire.a.device.public_key)
    assert wire.b.device.receive_datagram(old.data, wire.a.endpoint, 1000.0) == []
    assert wire.b.device.counters.drops[Drop.UNKNOWN_RECEIVER] == 1
    assert wire.b.device.send_packet(packets.ipv4(B4, A4, b"x"), 1000.0) == []


def test_packets_in_flight_on_the_previous_key_survive_a_rekey(wire: Any, packets: Any) -> None:
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    wire.up = False
    wire.send(wire.b, packets.ipv4(B4, A4, b"in flight"))
    in_flight = wire.sent_by("b", constants.MESSAGE_TRANSPORT)[-1]
    wire.up = True
    wire.clock.advance(121)
    wire.send(wire.a, packets.ipv4(A4, B4, b"rekey"))  # a rekeys; b confirms the new key
    peer_a = wire.b.device.peers[wire.a.device.public_key]
    wire.send(wire.a, packets.ipv4(A4, B4, b"confirm"))
    assert peer_a.previous is not None
    wire.run(wire.b, [actions.SendDatagram(in_flight.data, wire.a.endpoint)])
    assert wire.a.delivered == [packets.ipv4(B4, A4, b"in flight")]


def test_at_most_128_packets_wait_for_a_handshake(wire: Any, packets: Any) -> None:
    wire.up = False
    for i in range(130):
        wire.send(wire.a, packets.ipv4(A4, B4, i.to_bytes(2, "big")))
    assert wire.a.device.counters.drops[Drop.STAGED_OVERFLOW] == 2
    wire.up = True
    wire.advance(6)  # the retransmitted initiation gets through
    assert [p[20:] for p in wire.b.delivered] == [i.to_bytes(2, "big") for i in range(2, 130)]


# Fuzzing: nothing a peer sends may raise, deliver, or go uncounted.


def _total(counts: counters.Counters) -> int:
    return sum(counts.as_dict().values())


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda kind, rest: bytes([kind, 0, 0, 0]) + rest,
            st.integers(1, 4),
            st.binary(max_size=160),
        ),
    )
)
def test_arbitrary_bytes_never_raise_and_are_counted(
    wire_factory: Any, packets: Any, data: bytes
) -> None:
    w = wire_factory()
    w.send(w.a, packets.ipv4(A4, B4, b"hello"))
    dev = w.b.device
    before = _total(dev.counters)
    # The loop's way first (a datagram read alone): it declines, changing nothing.
    assert dev.receive_alone(data, ("203.0.113.1", 9), 1000.0) is None
    assert _total(dev.counters) == before
    replies = dev.receive_datagram(data, ("203.0.113.1", 9), 1000.0)
    assert not any(isinstance(a, actions.DeliverPacket) for a in replies)
    assert dev.counters.drops[Drop.INTERNAL_ERROR] == 0
    assert _total(dev.counters) > before


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_valid_messages_are_dropped_and_counted(
    wire_factory: Any, packets: Any, data: st.DataObject
) -> None:
    w = wire_factory()
    w.b.device.under_load = data.draw(st.booleans())
    w.a.device.under_load = data.draw(st.booleans())
    w.send(w.a, packets.ipv4(A4, B4, b"hello"))
    w.send(w.b, packets.ipv4(B4, A4, b"world"))
    original = data.draw(st.sampled_from(w.log))
    raw = bytearray(original.data)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=32))
    target = w.b if original.source == "a" else w.a
    source = w.a if original.source == "a" else w.b
    before = _total(target.device.counters)
    delivered_before = len(target.delivered)
    assert target.device.receive_alone(bytes(raw), source.endpoint, 1000.0) is None
    assert _total(target.device.counters) == before
    replies = target.device.receive_datagram(bytes(raw), source.endpoint, 1000.0)
    assert not any(isinstance(a, actions.DeliverPacket) for a in replies)
    assert len(target.delivered) == delivered_before
    assert target.device.counters.drops[Drop.INTERNAL_ERROR] == 0
    assert _total(target.device.counters) > before


def test_a_packet_to_the_peers_own_endpoint_is_not_encapsulated(wire: Any, packets: Any) -> None:
    """A route that sends the peer's endpoint through the tunnel would loop: each datagram
    the engine sends would come back to it as a packet to encapsulate again."""
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    wire.a.device.allowed_ips.insert("192.0.2.0/24", peer_b)  # covers b's endpoint
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))  # a session
    sent = len(wire.log)
    looped = packets.ipv4(A4, wire.b.endpoint[0], b"to the endpoint")
    assert wire.a.device.send_packet(looped, wire.clock.monotonic()) == []
    assert wire.a.device.counters.drops[Drop.ROUTING_LOOP] == 1
    assert peer_b.routing_loops == 1
    assert len(wire.log) == sent
    # Another address the same route covers is carried.
    other = packets.ipv4(A4, "192.0.2.77", b"elsewhere")
    assert len(wire.a.device.send_packet(other, wire.clock.monotonic())) == 1
    # IPv6 endpoints too, once the peer roams there.
    wire.a.device.allowed_ips.insert("2001:db8::/64", peer_b)
    peer_b.endpoint = ("2001:db8::2", 51821)
    looped6 = packets.ipv6(A6, "2001:db8::2", b"to the endpoint")
    assert wire.a.device.send_packet(looped6, wire.clock.monotonic()) == []
    assert wire.a.device.counters.drops[Drop.ROUTING_LOOP] == 2
