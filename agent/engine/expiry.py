"""The timers' dispatch: what the device does when a peer's timer fires (paper section 6).

`timers.PeerTimers` keeps each peer's deadlines and decides; this module acts on what fired,
from the device's tick: retransmit the handshake or give up, send the keepalive that answers
data, start a new handshake when data went unanswered, zero the keys, keep a NAT mapping open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from podwire.agent.engine import peer, send, timers
from podwire.agent.engine.actions import Action
from podwire.agent.engine.counters import Drop

if TYPE_CHECKING:
    from podwire.agent.engine import device


def tick(dev: device.Device, now: float) -> list[Action]:
    """Run the timers due at `now`; call every ~100 ms or at next_deadline()."""
    actions: list[Action] = []
    if dev.previous is not None and dev.previous_identity(now) is None:
        dev.previous = None  # the grace is over: the previous key is no longer answered
    for p in list(dev.peers.values()):
        if p.handshake_requested:
            p.handshake_requested = False
            send.send_initiation(dev, p, now, actions, retry=False)
        if p.keepalive_requested:
            p.keepalive_requested = False
            send.send_keepalive(dev, p, now, actions)
        for timer in p.timers.pop_expired(now):
            if p.public_key not in dev.peers:
                break
            _EXPIRED[timer](dev, p, now, actions)
    return actions


def next_deadline(dev: device.Device) -> float | None:
    """The earliest monotonic time at which tick() has work; 0.0 means at once."""
    deadlines = []
    for p in dev.peers.values():
        if p.keepalive_requested or p.handshake_requested:
            return 0.0
        d = p.timers.next_deadline()
        if d is not None:
            deadlines.append(d)
    return min(deadlines) if deadlines else None


def expired_retransmit_handshake(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action]
) -> None:
    if p.timers.expired_retransmit_handshake(now):
        send.send_initiation(dev, p, now, actions, retry=True)
        return
    # Gave up: what waited for this session will not be sent.
    dev.counters.drops[Drop.STAGED_GIVEN_UP] += len(p.staged)
    p.staged.clear()


def expired_send_keepalive(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action]
) -> None:
    send.send_keepalive(dev, p, now, actions)
    p.timers.expired_send_keepalive(now)


def expired_new_handshake(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action]
) -> None:
    # We sent data and heard nothing back for keepalive + rekey timeout.
    send.send_initiation(dev, p, now, actions, retry=False)


def expired_zero_key_material(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action]
) -> None:
    dev.index.forget_handshake(p)
    p.handshake.clear()
    dev.index.drop_keypairs(p.clear_keypairs())
    dev.counters.keys_zeroed += 1


def expired_send_persistent_keepalive(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action]
) -> None:
    if p.persistent_keepalive_interval:
        send.send_keepalive(dev, p, now, actions)


_EXPIRED: dict[timers.Timer, Callable[[device.Device, peer.Peer, float, list[Action]], None]] = {
    timers.Timer.RETRANSMIT_HANDSHAKE: expired_retransmit_handshake,
    timers.Timer.SEND_KEEPALIVE: expired_send_keepalive,
    timers.Timer.NEW_HANDSHAKE: expired_new_handshake,
    timers.Timer.ZERO_KEY_MATERIAL: expired_zero_key_material,
    timers.Timer.SEND_PERSISTENT_KEEPALIVE: expired_send_persistent_keepalive,
}
