"""Each timer rule of paper section 6, by driving two Devices over the in-memory wire on a
fake clock (ticking every 100 ms, as the I/O loop does)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from podwire.agent.engine import constants, timers
from podwire.agent.engine.counters import Drop

A4, B4 = "10.0.1.1", "10.0.2.1"
INIT, DATA = constants.MESSAGE_INITIATION, constants.MESSAGE_TRANSPORT


def _session(wire: Any, packets: Any) -> float:
    """a initiates and sends one packet; returns the time the session began."""
    wire.send(wire.a, packets.ipv4(A4, B4, b"hello"))
    assert wire.b.delivered
    return float(wire.clock.monotonic())


def _peer(wire: Any, on: str) -> Any:
    node, other = (wire.a, wire.b) if on == "a" else (wire.b, wire.a)
    return node.device.peers[other.device.public_key]


def test_a_keepalive_answers_received_data_after_ten_seconds(wire: Any, packets: Any) -> None:
    t0 = _session(wire, packets)
    wire.advance(9.9)
    assert wire.keepalives_by("b") == []
    wire.advance(0.2)
    assert [round(k.time - t0, 1) for k in wire.keepalives_by("b")] == [10.0]
    wire.advance(60)
    assert len(wire.keepalives_by("b")) == 1  # an idle tunnel then stays silent
    assert len(wire.sent_by("a")) == 2  # the initiation and the one packet


def test_data_arriving_while_a_keepalive_is_pending_earns_another(wire: Any, packets: Any) -> None:
    t0 = _session(wire, packets)
    wire.advance(5)
    wire.send(wire.a, packets.ipv4(A4, B4, b"more"))
    wire.advance(30)
    assert [round(k.time - t0) for k in wire.keepalives_by("b")] == [10, 20]


def test_data_sent_back_in_time_replaces_the_keepalive(wire: Any, packets: Any) -> None:
    _session(wire, packets)
    wire.advance(3)
    wire.send(wire.b, packets.ipv4(B4, A4, b"reply"))
    wire.advance(30)
    assert wire.keepalives_by("b") == []
    assert len(wire.keepalives_by("a")) == 1  # a answers b's reply in turn


def test_unanswered_data_starts_a_new_handshake_after_fifteen_seconds(
    wire: Any, packets: Any
) -> None:
    t0 = _session(wire, packets)
    wire.filter = lambda s: None if s.source == "b" else s  # b's answers are lost
    wire.send(wire.a, packets.ipv4(A4, B4, b"anyone?"))
    wire.advance(14.9)
    assert len(wire.sent_by("a", INIT)) == 1
    wire.advance(0.6)
    initiations = wire.sent_by("a", INIT)
    assert len(initiations) == 2
    assert 15.0 <= initiations[1].time - t0 <= 15.0 + 1 / 3 + 0.1


def test_the_initiator_rekeys_on_send_after_rekey_after_time(wire: Any, packets: Any) -> None:
    t0 = _session(wire, packets)
    old_key = _peer(wire, "a").current
    wire.advance(119 - (wire.clock.monotonic() - t0))
    wire.send(wire.b, packets.ipv4(B4, A4, b"responder"))  # the responder never rekeys on time
    wire.send(wire.a, packets.ipv4(A4, B4, b"young"))
    assert len(wire.sent_by("a", INIT)) == 1 and len(wire.sent_by("b", INIT)) == 0
    wire.advance(2)
    wire.send(wire.a, packets.ipv4(A4, B4, b"old"))
    assert len(wire.sent_by("a", INIT)) == 2
    assert wire.b.delivered[-1] == packets.ipv4(A4, B4, b"old")  # sent with the old key too
    assert _peer(wire, "a").current is not old_key
    assert _peer(wire, "a").previous is old_key


def test_rekey_after_messages(wire_factory: Any, packets: Any) -> None:
    wire = wire_factory(timers=timers.ProtocolTimers(rekey_after_messages=5))
    _session(wire, packets)  # message 1 on this key
    wire.advance(6)  # past the rekey timeout that follows any initiation
    for i in range(4):  # messages 2..5
        wire.send(wire.a, packets.ipv4(A4, B4, bytes([i])))
    assert len(wire.sent_by("a", INIT)) == 1
    wire.send(wire.a, packets.ipv4(A4, B4, b"6"))  # the 6th exceeds 5
    assert len(wire.sent_by("a", INIT)) == 2
    assert len(wire.b.delivered) == 6


def test_keys_older_than_reject_after_time_are_never_used(wire: Any, packets: Any) -> None:
    t0 = _session(wire, packets)
    wire.advance(179.5 - (wire.clock.monotonic() - t0))
    wire.up = False
    wire.send(wire.a, packets.ipv4(A4, B4, b"late"))
    late = wire.sent_by("a", DATA)[-1]
    assert late.time - t0 < 180
    wire.advance(1)
    # Arriving after reject-after-time, it is refused by b...
    assert wire.b.device.receive_datagram(late.data, wire.a.endpoint, wire.clock.monotonic()) == []
    assert wire.b.device.counters.drops[Drop.KEY_EXPIRED] == 1
    # ...and a no longer encrypts with the expired key: it only tries to handshake.
    sent_before = len(wire.sent_by("a", DATA))
    wire.send(wire.a, packets.ipv4(A4, B4, b"later"))
    assert len(wire.sent_by("a", DATA)) == sent_before


def test_an_initiator_receiving_on_an_aging_key_rekeys_at_once(
    wire_factory: Any, packets: Any
) -> None:
    c = timers.ProtocolTimers()
    threshold = c.reject_after_time - c.keepalive_timeout - c.rekey_timeout  # 165 s
    results = {}
    for age in (threshold - 5, threshold + 1):
        wire = wire_factory()
        t0 = _session(wire, packets)
        wire.advance(age - (wire.clock.monotonic() - t0))
        before = len(wire.sent_by("a", INIT))
        wire.send(wire.b, packets.ipv4(B4, A4, b"data"))
        results[age] = len(wire.sent_by("a", INIT)) - before
    assert results == {threshold - 5: 0, threshold + 1: 1}


def test_handshake_retransmission_with_jitter_then_giving_up(wire: Any, packets: Any) -> None:
    wire.up = False  # b is unreachable
    config = timers.ProtocolTimers()
    t0 = wire.clock.monotonic()
    wire.send(wire.a, packets.ipv4(A4, B4, b"queued"))
    wire.advance(150, step=0.01)
    times = [s.time - t0 for s in wire.sent_by("a", INIT)]
    # The first, then a retry every rekey-timeout plus up to 333 ms of jitter, until the
    # attempts exceed REKEY_ATTEMPT_TIME / REKEY_TIMEOUT (the kernel's count: 20 messages).
    assert len(times) == config.max_timer_handshakes + 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(5.0 <= gap <= 5.0 + 1 / 3 + 0.02 for gap in gaps), gaps
    assert len({round(gap, 2) for gap in gaps}) > 3  # jittered, not in lockstep
    assert times[-1] >= config.rekey_attempt_time
    assert wire.a.device.counters.drops[Drop.STAGED_GIVEN_UP] == 1

    # The queued packet is gone for good: a later session carries only new traffic.
    wire.up = True
    wire.advance(100)
    assert len(wire.sent_by("a", INIT)) == len(times)
    wire.send(wire.a, packets.ipv4(A4, B4, b"fresh"))
    assert wire.b.delivered == [packets.ipv4(A4, B4, b"fresh")]


def test_persistent_keepalive(wire: Any, packets: Any) -> None:
    _session(wire, packets)
    wire.advance(20)
    assert wire.keepalives_by("a") == []  # off by default
    _peer(wire, "a").persistent_keepalive_interval = 25
    start = wire.clock.monotonic()
    wire.advance(80)
    times = [k.time - start for k in wire.keepalives_by("a")]
    # one at the next tick, then one per 25 s of silence (to the 100 ms tick)
    assert len(times) == 4 and times[0] <= 0.11
    assert all(25 <= b - a <= 25.11 for a, b in itertools.pairwise(times)), times
    _peer(wire, "a").persistent_keepalive_interval = 0
    wire.advance(60)
    assert len(wire.keepalives_by("a")) == 4


def test_key_material_is_zeroed_after_three_times_reject_after_time(
    wire: Any, packets: Any
) -> None:
    t0 = _session(wire, packets)
    wire.advance(539 - (wire.clock.monotonic() - t0), step=1.0)
    assert _peer(wire, "a").current is not None and _peer(wire, "b").current is not None
    wire.advance(2, step=0.1)
    for side in ("a", "b"):
        assert list(_peer(wire, side).keypairs()) == []
    assert wire.a.device.counters.keys_zeroed == 1
    # Traffic simply starts a new session.
    wire.send(wire.a, packets.ipv4(A4, B4, b"again"))
    assert wire.b.delivered[-1] == packets.ipv4(A4, B4, b"again")


@pytest.mark.parametrize("interval", [0, 5])
def test_next_deadline_tells_when_tick_has_work(wire: Any, packets: Any, interval: int) -> None:
    assert wire.a.device.next_deadline() is None
    _session(wire, packets)
    deadline = wire.b.device.next_deadline()
    assert deadline == pytest.approx(wire.clock.monotonic() + 10)  # b's keepalive
    _peer(wire, "a").persistent_keepalive_interval = interval
    if interval:
        assert wire.a.device.next_deadline() == 0.0  # a keepalive is due at once
