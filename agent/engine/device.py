"""The WireGuard device: its configuration, its peers, and the datapath's entry points.

This is the contract with the engine's I/O loop. The loop hands in what it read (a datagram
from UDP, a packet from TUN, the passing of time) with the current monotonic time, and gets
back actions to perform (send a datagram, deliver a packet to TUN). Nothing here blocks,
sleeps, reads a clock or raises on what a peer sends: every malformed or unauthenticated
datagram is dropped and counted in `counters`, which the I/O layer logs.

A key rotation loses nothing. A new private key keeps every session, and the replaced key
stays a second identity, answered for a grace (`ProtocolTimers.previous_key_grace`), so a
peer that has not heard of the new key yet still rekeys with the old one. A peer renamed in
place (`rename_peer`, when its key rotated) keeps its sessions, routes and counters and
initiates with its new key at once; its old session carries the data until the new one is up.

The datapath is split as wireguard-go splits its device: `indextable` (what a receiver index
names), `send` (TUN to UDP, and the handshake messages we send), `receive` (UDP to TUN, and
the handshake messages we consume) and `expiry` (what the timers do when they fire). The
Device holds the state they share and ties them together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeAlias

from podwire.agent.engine import (
    allowedips,
    constants,
    cookie,
    counters,
    expiry,
    indextable,
    noise,
    peer,
    ratelimiter,
    receive,
    send,
)
from podwire.agent.engine.timers import ProtocolTimers

Peer: TypeAlias = peer.Peer

DEFAULT_MTU = 1420


@dataclasses.dataclass(frozen=True, slots=True)
class PreviousIdentity:
    """The key the device had before its latest change, still answered for until `until`
    (monotonic): handshake messages whose mac1 is keyed for it are consumed with it."""

    identity: noise.StaticIdentity = dataclasses.field(repr=False)
    checker: cookie.CookieChecker = dataclasses.field(repr=False)
    until: float


class Device:
    def __init__(
        self,
        *,
        rng: Callable[[int], bytes],
        wall_clock: Callable[[], float],
        timers: ProtocolTimers = ProtocolTimers(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.rng = rng
        self.wall_clock = wall_clock
        self.timer_config = timers
        self.identity: noise.StaticIdentity | None = None
        self.previous: PreviousIdentity | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.mtu = DEFAULT_MTU
        # Set by the I/O loop, which sees the backlog: mac2, cookies and the rate limit apply.
        self.under_load = False
        # Handshake messages seen, however they ended: the I/O loop judges the load by it.
        self.handshake_messages = 0
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: allowedips.AllowedIPs[Peer] = allowedips.AllowedIPs()
        self.counters = counters.Counters()
        self.checker = cookie.CookieChecker()
        self.ratelimiter = ratelimiter.RateLimiter()
        self.index = indextable.IndexTable(rng)

    # The datapath's entry points: the functions themselves, bound as methods, so that a packet
    # costs no extra call.
    receive_datagram = receive.receive_datagram
    receive_alone = receive.receive_alone
    receive_datagrams = receive.receive_datagrams
    send_packet = send.send_packet
    send_alone = send.send_alone
    send_packets = send.send_packets
    tick = expiry.tick
    next_deadline = expiry.next_deadline

    # Configuration.

    @property
    def private_key(self) -> bytes | None:
        return self.identity.private_key if self.identity is not None else None

    def set_private_key(self, key: bytes | None, *, now: float) -> None:
        """Call when the configuration sets the key (all zero or None: no key).

        A key that replaces another keeps every session (they carry on until the peers
        rekey with the new key) and keeps the replaced key as the previous identity, still
        answered for `previous_key_grace` seconds. A peer with the new key is removed.
        """
        if key is not None and len(key) != constants.KEY_LEN:
            raise ValueError(f"a private key has 32 bytes, not {len(key)}")
        if key == noise.ZERO_KEY:
            key = None  # as wg: an all-zero key means no key
        if key == self.private_key:
            return
        replaced = self.identity
        self.identity = noise.StaticIdentity(bytes(key)) if key is not None else None
        self.previous = None
        if replaced is not None and self.identity is not None:
            self.previous = self._previous(replaced, now)
        rotated = self.previous is not None
        public = self.public_key
        self.checker.set_public_key(public)
        if public is not None and public in self.peers:
            self.remove_peer(public)  # a peer with our own key cannot be talked to
        for p in self.peers.values():
            p.handshake.precompute(self.identity)
            if not rotated:
                self.index.forget_handshake(p)
                p.expire_current_keypairs()

    def _previous(self, replaced: noise.StaticIdentity, now: float) -> PreviousIdentity:
        checker = cookie.CookieChecker()
        checker.set_public_key(replaced.public_key)
        return PreviousIdentity(replaced, checker, now + self.timer_config.previous_key_grace)

    def previous_identity(self, now: float) -> PreviousIdentity | None:
        """The previous identity if its grace still runs at `now`."""
        previous = self.previous
        if previous is None or now >= previous.until:
            return None
        return previous

    @property
    def public_key(self) -> bytes | None:
        return self.identity.public_key if self.identity is not None else None

    def add_peer(self, public_key: bytes) -> Peer:
        existing = self.peers.get(public_key)
        if existing is not None:
            return existing
        p = Peer(public_key, timer_config=self.timer_config, rng=self.rng)
        p.handshake.precompute(self.identity)
        self.peers[p.public_key] = p
        return p

    def rename_peer(self, old: bytes, new: bytes) -> Peer | None:
        """The peer `old` takes the key `new` in place (its key rotated) and initiates a
        handshake with it at the next tick; its sessions carry data until the new one is
        confirmed. None if there is no peer `old`; ValueError if a peer `new` exists."""
        p = self.peers.get(old)
        if p is None or old == new:
            return p
        if new in self.peers or new == self.public_key:
            raise ValueError("a peer (or the device itself) has the new key")
        del self.peers[old]
        p.rename(new)
        p.handshake.precompute(self.identity)
        self.peers[new] = p
        if p.endpoint is not None:
            p.last_sent_handshake = None  # at once, however recent the last one was
            p.handshake_requested = True
        return p

    def remove_peer(self, public_key: bytes) -> None:
        p = self.peers.pop(public_key, None)
        if p is None:
            return
        self.allowed_ips.remove_by_peer(p)
        self.index.forget_handshake(p)
        self.index.drop_keypairs(p.clear_keypairs())
        p.timers.stop()
        p.staged.clear()

    def remove_all_peers(self) -> None:
        for public_key in list(self.peers):
            self.remove_peer(public_key)

    # What the send and receive paths share.

    def find_handshake(self, static: bytes) -> noise.Handshake | None:
        """The handshake with the peer of this static key, if it is ours (for the responder)."""
        p = self.peers.get(static)
        return p.handshake if p is not None else None

    def begin_session(self, p: Peer, now: float) -> None:
        """The handshake is done on our side: its keypair takes over the handshake's index."""
        keypair = noise.begin_session(p.handshake, now=now)
        self.index.forget_handshake(p)
        self.index.add_keypair(keypair, p)
        self.index.drop_keypairs(p.install_keypair(keypair))
        p.timers.on_session_derived(now)
