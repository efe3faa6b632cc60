"""Device.receive_alone, the loop's way for a datagram read alone, against receive_datagram.

As for send_alone: two wires made alike live through the same events; on one, every datagram
is delivered the loop's way (receive_alone, and receive_datagram where it declines), on the
other always with receive_datagram. The state both leave (counters, packets delivered,
endpoints, timers, what crossed) must be the same at every step, replays, forgeries and
spoofed sources included: the shortcut only ever takes the common case.
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


def _last_transport(wire: Wire) -> Any:
    sent = [s for s in wire.log if s.kind == 4]
    return sent[-1] if sent else None


def _resend(wire: Wire, data_of: Any) -> None:
    """The last transport message that crossed, sent again as data_of makes it."""
    last = _last_transport(wire)
    if last is None:
        return
    origin = wire.a if last.source == "a" else wire.b
    wire.run(origin, [actions_mod.SendDatagram(data_of(last.data), last.endpoint)])


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


_events = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["a4", "b4"]), st.integers(0, 1400)),
        st.tuples(st.sampled_from(["a6", "b6"]), st.integers(0, 1380)),
        st.tuples(st.sampled_from(["spoof", "replay", "forge"]), st.just(0)),
        st.tuples(st.just("wait"), st.sampled_from([0.05, 1.0, 10.0, 30.0, 119.0, 181.0])),
        st.tuples(st.just("down"), st.booleans()),
    ),
    max_size=40,
)


def _happen(wire: Wire, packets: Any, kind: str, value: Any) -> None:
    if kind == "a4":
        wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, bytes(value)))
    elif kind == "a6":
        wire.send(wire.a, packets.ipv6(A_ADDR6, B_ADDR6, bytes(value)))
    elif kind == "b4":
        wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, bytes(value)))
    elif kind == "b6":
        wire.send(wire.b, packets.ipv6(B_ADDR6, A_ADDR6, bytes(value)))
    elif kind == "spoof":
        # b seals a packet whose source a never gave it: a must drop it after opening.
        wire.send(wire.b, packets.ipv4("10.9.9.9", A_ADDR4, b"spoofed"))
    elif kind == "replay":
        _resend(wire, lambda data: data)
    elif kind == "forge":
        _resend(wire, _flip)
    elif kind == "down":
        wire.up = not value


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(events=_events, small=st.booleans(), persistent=st.sampled_from([0, 5]))
# A keepalive answers data after ten quiet seconds; the keepalive is receive_datagram's.
@example(events=[("a4", 10), ("wait", 10.0), ("wait", 1.0), ("a4", 5)], small=False,
         persistent=0)  # fmt: skip
# The responder's first data confirms its next keypair: receive_datagram's to do.
@example(events=[("a4", 1), ("b4", 1), ("a6", 2), ("replay", 0), ("forge", 0), ("spoof", 0)],
         small=False, persistent=5)  # fmt: skip
# Past rekey_after_messages, a new session: data on the old and the new keypair.
@example(events=[("a4", 1)] * 13 + [("b4", 1), ("a4", 2), ("b6", 3), ("replay", 0)],
         small=True, persistent=0)  # fmt: skip
# The initiator near reject-after-time hears data: the last-minute handshake.
@example(events=[("a4", 1), ("b4", 1), ("wait", 119.0), ("wait", 30.0), ("b4", 2), ("b4", 3)],
         small=False, persistent=0)  # fmt: skip
def test_receive_alone_changes_nothing_that_receive_datagram_would_not(
    twin_wires: Any, packets: Any, events: list[tuple[str, Any]], small: bool, persistent: int
) -> None:
    shortcut, plain = twin_wires(SMALL if small else None, persistent)
    shortcut.alone = True
    shortcut.live_through_with(
        plain, events, lambda wire, kind, value: _happen(wire, packets, kind, value)
    )


@pytest.mark.parametrize("family", [4, 6])
def test_receive_alone_takes_an_established_sessions_packet(
    wire: Wire, packets: Any, family: int
) -> None:
    wire.alone = True
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))  # the handshake
    wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, b"answer"))
    taken = wire.taken_alone
    if family == 4:
        sent = [packets.ipv4(A_ADDR4, B_ADDR4, body) for body in (b"second", b"third")]
    else:
        sent = [packets.ipv6(A_ADDR6, B_ADDR6, body) for body in (b"second", b"third")]
    for packet in sent:
        wire.send(wire.a, packet)
    assert wire.b.delivered[-2:] == sent
    assert wire.taken_alone == taken + 2
    peer_a = next(iter(wire.b.device.peers.values()))
    assert peer_a.endpoint == wire.a.endpoint
    assert peer_a.timers.send_keepalive_at is not None  # data received: a keepalive is due


def test_receive_alone_declines_what_it_cannot_take_and_changes_nothing(
    wire: Wire, packets: Any
) -> None:
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, b"answer"))
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"taken"))
    taken = _last_transport(wire).data
    wire.log.clear()
    b = wire.b.device
    now = wire.clock.monotonic()
    source = wire.a.endpoint
    declined = {
        "replayed": taken,
        "forged": _flip(taken),
        "short": taken[:20],
        "a handshake's type": bytes([1]) + taken[1:],
        "an unknown receiver": taken[:4] + b"\xff\xff\xff\xff" + taken[8:],
    }
    for what, data in declined.items():
        before = wire.state()
        assert b.receive_alone(data, source, now) is None, what
        assert wire.state() == before, what


def test_receive_alone_leaves_drops_to_receive_datagram(wire: Wire, packets: Any) -> None:
    wire.alone = True
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, b"answer"))
    wire.send(wire.b, packets.ipv4("10.9.9.9", A_ADDR4, b"spoofed"))
    _resend(wire, lambda data: data)
    _resend(wire, _flip)
    drops = wire.a.device.counters.drops
    assert drops[Drop.BAD_SOURCE_ADDRESS] == 1
    assert drops[Drop.REPLAYED] == 1
    assert drops[Drop.BAD_AEAD] == 1
    assert wire.a.delivered == [packets.ipv4(B_ADDR4, A_ADDR4, b"answer")]


def test_receive_alone_never_raises_on_what_a_peer_sends(
    wire: Wire, packets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What reaches the socket is a peer's (or anyone's) to choose: as receive_datagram,
    receive_alone never raises, whatever goes wrong inside; it counts an internal error and
    declines, and the engine's loop lives on."""
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"first"))
    wire.send(wire.b, packets.ipv4(B_ADDR4, A_ADDR4, b"answer"))
    wire.send(wire.a, packets.ipv4(A_ADDR4, B_ADDR4, b"next"))
    data = _last_transport(wire).data
    b = wire.b.device

    def broken(_address: int) -> None:
        raise RuntimeError("a bug in allowed-ips")

    monkeypatch.setattr(b.allowed_ips, "lookup_v4", broken)
    forged = _flip(data)  # never authentic: declined before the lookup, no error counted
    assert b.receive_alone(forged, wire.a.endpoint, wire.clock.monotonic()) is None
    fresh = _resealed(wire, packets.ipv4(A_ADDR4, B_ADDR4, b"after"))
    assert b.receive_alone(fresh, wire.a.endpoint, wire.clock.monotonic()) is None
    assert b.counters.drops[Drop.INTERNAL_ERROR] == 1


def _resealed(wire: Wire, packet: bytes) -> bytes:
    """packet sealed by a for b, as it would cross, without delivering it."""
    now = wire.clock.monotonic()
    sealed = wire.a.device.send_alone(packet, now)
    assert sealed is not None
    return bytes(sealed[0])
