"""Key rotation over the in-memory wire: b's engine takes a new private key and keeps
answering for the previous one for a grace; a renames b's peer in place and handshakes with
the new key at once. Neither step may lose a packet.

a (knows b as Kb, then Kb')  ======  b (Kb, then Kb'; still answers for Kb in the grace)
"""

from __future__ import annotations

from typing import Any

import pytest

from podwire.agent.engine import constants, noise, timers
from podwire.agent.engine.counters import Drop

A4, B4 = "10.0.1.1", "10.0.2.1"
GRACE = 10.0
INITIATION, RESPONSE, COOKIE_REPLY = 1, 2, 3


@pytest.fixture
def w(wire_factory: Any) -> Any:
    return wire_factory(timers=timers.ProtocolTimers(previous_key_grace=GRACE))


def _new_key(rng_factory: Any, seed: int = 99) -> bytes:
    # The wire's own keys and randomness come from seeds below 1010.
    return bytes(rng_factory(seed + 2000)(32))


def _exchange(w: Any, packets: Any, tag: bytes) -> None:
    """One packet each way; asserts both are delivered."""
    ping, pong = packets.ipv4(A4, B4, b"ping " + tag), packets.ipv4(B4, A4, b"pong " + tag)
    w.send(w.a, ping)
    w.send(w.b, pong)
    assert w.b.delivered[-1] == ping, tag
    assert w.a.delivered[-1] == pong, tag


def _peer_of_b(w: Any) -> Any:
    (peer,) = w.a.device.peers.values()
    return peer


def _rotate_b(w: Any, key: bytes) -> bytes:
    old = w.b.device.public_key
    w.b.device.set_private_key(key, now=w.clock.monotonic())
    return bytes(old)


def _forget_and_readd_b(w: Any, key: bytes) -> None:
    """a starts over with b (as `wg set peer ... remove` then adding it back would)."""
    a = w.a.device
    a.remove_peer(next(iter(a.peers)))
    peer = a.add_peer(key)
    peer.endpoint = w.b.endpoint
    a.allowed_ips.insert("10.0.2.0/24", peer)


# The previous identity.


def test_a_new_private_key_keeps_the_sessions(w: Any, packets: Any, rng_factory: Any) -> None:
    _exchange(w, packets, b"before")
    new = _new_key(rng_factory)
    w.b.device.add_peer(noise.public_key(new))  # a peer with the key to be: removed, as in wg
    _rotate_b(w, new)
    assert noise.public_key(new) not in w.b.device.peers
    assert w.b.device.public_key == noise.public_key(new)
    _exchange(w, packets, b"after")
    # Carried by the sessions made with the old key: no handshake was needed.
    assert len(w.sent_by("a", INITIATION) + w.sent_by("b", INITIATION)) == 1


def test_the_previous_key_is_answered_in_its_grace_and_refused_after(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    old = _rotate_b(w, _new_key(rng_factory))
    # a has not learnt Kb' and starts a fresh session with Kb: b answers as Kb.
    w.clock.advance(GRACE - 1)
    _forget_and_readd_b(w, old)
    _exchange(w, packets, b"in the grace")
    assert w.b.device.counters.previous_key_handshakes == 1
    assert _peer_of_b(w).last_handshake_wall == w.clock.wall()

    w.advance(1.1)  # the grace is over; the tick forgets the previous key
    assert w.b.device.previous is None
    _forget_and_readd_b(w, old)
    bad_mac1 = w.b.device.counters.drops[Drop.BAD_MAC1]
    w.send(w.a, packets.ipv4(A4, B4, b"too late"))
    assert w.b.delivered[-1] != packets.ipv4(A4, B4, b"too late")
    assert w.b.device.counters.drops[Drop.BAD_MAC1] == bad_mac1 + 1
    assert not w.sent_by("b", RESPONSE, since=w.clock.monotonic())


def test_own_initiations_use_the_current_key(w: Any, packets: Any, rng_factory: Any) -> None:
    _exchange(w, packets, b"before")
    _rotate_b(w, _new_key(rng_factory))
    peer_a = w.b.device.peers[w.a.device.public_key]
    peer_a.expire_current_keypairs()
    w.send(w.b, packets.ipv4(B4, A4, b"new session"))
    # a knows b only as Kb: the initiation, made with Kb', names a peer a does not have.
    assert w.sent_by("b", INITIATION)[-1].time == w.clock.monotonic()
    assert w.a.device.counters.drops[Drop.NO_PEER] == 1


def test_a_second_change_keeps_only_the_key_it_replaced(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    first = _rotate_b(w, _new_key(rng_factory, 1))
    w.clock.advance(5)
    second = _rotate_b(w, _new_key(rng_factory, 2))
    assert w.b.device.previous is not None
    assert w.b.device.previous.identity.public_key == second
    assert w.b.device.previous.until == w.clock.monotonic() + GRACE

    _forget_and_readd_b(w, first)
    w.send(w.a, packets.ipv4(A4, B4, b"to the first key"))
    assert w.b.device.counters.drops[Drop.BAD_MAC1] == 1
    _forget_and_readd_b(w, second)
    _exchange(w, packets, b"to the second key")
    assert w.b.device.counters.previous_key_handshakes == 1


def test_setting_the_same_key_again_changes_nothing(w: Any, packets: Any, rng_factory: Any) -> None:
    _exchange(w, packets, b"before")
    key = w.b.device.private_key
    w.b.device.set_private_key(key, now=w.clock.monotonic())
    assert w.b.device.previous is None
    old = _rotate_b(w, _new_key(rng_factory))
    until = w.b.device.previous.until
    w.clock.advance(3)
    w.b.device.set_private_key(_new_key(rng_factory), now=w.clock.monotonic())
    assert w.b.device.previous.until == until
    assert w.b.device.previous.identity.public_key == old
    _exchange(w, packets, b"after")


def test_removing_the_key_drops_the_previous_one_and_the_sessions(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    _rotate_b(w, _new_key(rng_factory))
    w.b.device.set_private_key(bytes(32), now=w.clock.monotonic())
    assert w.b.device.previous is None and w.b.device.identity is None
    w.send(w.b, packets.ipv4(B4, A4, b"nothing to send with"))
    assert w.a.delivered[-1] != packets.ipv4(B4, A4, b"nothing to send with")


def test_an_initiation_in_flight_across_the_change_completes(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    held: list[Any] = []
    w.filter = lambda s: held.append(s) if s.source == "a" and s.kind == RESPONSE else s
    peer_a = w.b.device.peers[w.a.device.public_key]
    peer_a.expire_current_keypairs()
    w.send(w.b, packets.ipv4(B4, A4, b"waits for the handshake"))
    (response,) = held
    _rotate_b(w, _new_key(rng_factory))
    w.filter = lambda s: s
    w.run(w.a, [_datagram(response)])
    # a keyed the response's mac1 for Kb; b consumes it as Kb and sends what waited.
    assert w.b.device.counters.previous_key_handshakes == 1
    assert w.a.delivered[-1] == packets.ipv4(B4, A4, b"waits for the handshake")


def test_under_load_the_previous_key_answers_with_its_own_cookie(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    old = _rotate_b(w, _new_key(rng_factory))
    _forget_and_readd_b(w, old)
    w.b.device.under_load = True
    w.send(w.a, packets.ipv4(A4, B4, b"under load"))
    # a opens the cookie (sealed with Kb's cookie key) and its retry carries mac2.
    assert len(w.sent_by("b", COOKIE_REPLY)) == 1
    assert w.a.device.counters.cookie_replies_received == 1
    w.advance(constants.REKEY_TIMEOUT + 1.5)
    assert w.b.device.counters.previous_key_handshakes == 1
    assert w.b.delivered[-1] == packets.ipv4(A4, B4, b"under load")


def _datagram(sent: Any) -> Any:
    from podwire.agent.engine import actions

    return actions.SendDatagram(sent.data, sent.endpoint)


# Renaming a peer in place.


def _rename_b(w: Any, new: bytes) -> Any:
    old = _peer_of_b(w).public_key
    return w.a.device.rename_peer(old, new)


def test_a_renamed_peer_keeps_its_sessions_routes_and_handshakes_at_once(
    w: Any, packets: Any, rng_factory: Any
) -> None:
    _exchange(w, packets, b"before")
    peer = _peer_of_b(w)
    keypairs, endpoint, rx = peer.current, peer.endpoint, peer.rx_bytes
    _rotate_b(w, _new_key(rng_factory))
    # A packet b sent on the old session, still in flight when a renames.
    w.up = False
    w.send(w.b, packets.ipv4(B4, A4, b"in flight"))
    in_flight = w.sent_by("b")[-1]
    w.up = True

    w.clock.advance(0.3)
    new = w.b.device.public_key
    assert _rename_b(w, new) is peer
    assert set(w.a.device.peers) == {new} and peer.public_key == new
    assert (peer.current, peer.endpoint, peer.rx_bytes) == (keypairs, endpoint, rx)
    assert w.a.device.allowed_ips.lookup_v4(int.from_bytes(bytes([10, 0, 2, 9]), "big")) is peer
    assert w.a.device.allowed_ips.entries_for_peer(peer)

    w.tick()  # the handshake with Kb' goes at once, answered by b's current key
    assert w.sent_by("a", INITIATION)[-1].time == w.clock.monotonic()
    assert peer.last_handshake_wall == w.clock.wall()
    assert peer.current is not keypairs and peer.previous is keypairs
    assert w.b.device.counters.previous_key_handshakes == 0
    w.run(w.b, [_datagram(in_flight)])
    assert w.a.delivered[-1] == packets.ipv4(B4, A4, b"in flight")
    _exchange(w, packets, b"after")


def test_renaming_first_then_rotating_loses_nothing(w: Any, packets: Any, rng_factory: Any) -> None:
    """The other order: a hears of Kb' before b uses it. a's initiation to Kb' goes
    unanswered; traffic stays on the old session until a's retry after b's change."""
    _exchange(w, packets, b"before")
    key = _new_key(rng_factory)
    _rename_b(w, noise.public_key(key))
    w.tick()
    assert w.b.device.counters.drops[Drop.BAD_MAC1] == 1
    for i in range(10):
        w.advance(0.1)
        _exchange(w, packets, b"%d" % i)
    _rotate_b(w, key)
    for i in range(100):
        w.advance(0.1)
        _exchange(w, packets, b"after %d" % i)
    assert _peer_of_b(w).last_handshake_wall is not None
    assert w.b.device.counters.handshakes_completed == 2


def test_a_rename_onto_an_existing_peer_is_refused(w: Any, rng_factory: Any) -> None:
    other = noise.public_key(_new_key(rng_factory))
    w.a.device.add_peer(other)
    old = w.b.device.public_key
    with pytest.raises(ValueError):
        w.a.device.rename_peer(old, other)
    assert set(w.a.device.peers) == {old, other}
    assert w.a.device.rename_peer(noise.public_key(_new_key(rng_factory, 5)), other) is None
