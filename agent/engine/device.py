"""The WireGuard device: configuration, the index table, and the datapath as pure functions.

This is the contract with the engine's I/O loop. The loop hands in what it read (a datagram
from UDP, a packet from TUN, the passing of time) with the current monotonic time, and gets
back actions to perform (send a datagram, deliver a packet to TUN). Nothing here blocks,
sleeps, reads a clock or raises on what a peer sends: every malformed or unauthenticated
datagram is dropped and counted in `counters`, which the I/O layer logs.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import TypeAlias

from cryptography.exceptions import InvalidTag

from podwire.agent.engine import allowedips, cookie, messages, noise, peer, ratelimiter, timers
from podwire.agent.engine.timers import ProtocolTimers

Endpoint: TypeAlias = tuple[str, int]
Peer: TypeAlias = peer.Peer

DEFAULT_MTU = 1420

_TYPE = messages.TYPE
_HEADER = messages.TRANSPORT_HEADER
_HEADER_LEN = messages.TRANSPORT_HEADER_LEN
_NONCE = struct.Struct("<4xQ")
_TRANSPORT = messages.MESSAGE_TRANSPORT


@dataclasses.dataclass(frozen=True, slots=True)
class SendDatagram:
    data: bytes
    endpoint: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverPacket:
    """A decrypted IP packet for the TUN device."""

    packet: bytes


Action = SendDatagram | DeliverPacket


@dataclasses.dataclass
class Counters:
    """Drops by reason, then what was handled. Field names are stable: the I/O layer logs them."""

    # dropped datagrams (receive side)
    short: int = 0
    unknown_type: int = 0
    bad_length: int = 0
    bad_mac1: int = 0
    bad_mac2_needs_cookie: int = 0
    rate_limited: int = 0
    no_identity: int = 0
    no_peer: int = 0
    bad_aead: int = 0
    bad_dh: int = 0
    bad_state: int = 0
    stale_timestamp: int = 0
    flood: int = 0
    unknown_receiver: int = 0
    bad_cookie_reply: int = 0
    key_expired: int = 0
    replayed: int = 0
    bad_ip_packet: int = 0
    bad_source_address: int = 0
    internal_error: int = 0
    # dropped packets (send side)
    no_route: int = 0
    no_endpoint: int = 0
    staged_overflow: int = 0
    staged_given_up: int = 0
    # handled
    initiations_received: int = 0
    responses_received: int = 0
    cookie_replies_received: int = 0
    transport_received: int = 0
    keepalives_received: int = 0
    packets_delivered: int = 0
    initiations_sent: int = 0
    responses_sent: int = 0
    cookie_replies_sent: int = 0
    transport_sent: int = 0
    keepalives_sent: int = 0
    handshakes_completed: int = 0
    keys_zeroed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Device:
    def __init__(
        self,
        *,
        rng: Callable[[int], bytes],
        wall_clock: Callable[[], float],
        timers: ProtocolTimers = ProtocolTimers(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self._rng = rng
        self._wall_clock = wall_clock
        self.timer_config = timers
        self._identity: noise.StaticIdentity | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.mtu = DEFAULT_MTU
        self.under_load = False
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: allowedips.AllowedIPs[Peer] = allowedips.AllowedIPs()
        self.counters = Counters()
        self._checker = cookie.CookieChecker()
        self._ratelimiter = ratelimiter.RateLimiter()
        # local index -> the peer whose handshake announced it, or the keypair that now owns it
        self._handshakes: dict[int, Peer] = {}
        self._keypairs: dict[int, tuple[noise.Keypair, Peer]] = {}

    # Configuration.

    @property
    def private_key(self) -> bytes | None:
        return self._identity.private_key if self._identity is not None else None

    @private_key.setter
    def private_key(self, key: bytes | None) -> None:
        if key is not None and len(key) != noise.KEY_LEN:
            raise ValueError(f"a private key has 32 bytes, not {len(key)}")
        if key == noise.ZERO_KEY:
            key = None  # as wg: an all-zero key means no key
        if key == self.private_key:
            return
        self._identity = noise.StaticIdentity(bytes(key)) if key is not None else None
        public = self.public_key
        self._checker.set_public_key(public)
        if public is not None and public in self.peers:
            self.remove_peer(public)  # a peer with our own key cannot be talked to
        for p in self.peers.values():
            p.handshake.precompute(self._identity)
            self._forget_handshake(p)
            p.expire_current_keypairs()

    @property
    def public_key(self) -> bytes | None:
        return self._identity.public_key if self._identity is not None else None

    def add_peer(self, public_key: bytes) -> Peer:
        existing = self.peers.get(public_key)
        if existing is not None:
            return existing
        p = Peer(public_key, timer_config=self.timer_config, rng=self._rng)
        p.handshake.precompute(self._identity)
        self.peers[p.public_key] = p
        return p

    def remove_peer(self, public_key: bytes) -> None:
        p = self.peers.pop(public_key, None)
        if p is None:
            return
        self.allowed_ips.remove_by_peer(p)
        self._forget_handshake(p)
        self._drop_keypairs(p.clear_keypairs())
        p.timers.stop()
        p.staged.clear()

    def remove_all_peers(self) -> None:
        for public_key in list(self.peers):
            self.remove_peer(public_key)

    # The datapath.

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        """A datagram from the UDP socket. Never raises."""
        try:
            if len(data) < 4:
                self.counters.short += 1
                return []
            kind = _TYPE.unpack_from(data)[0]
            if kind == _TRANSPORT:
                return self._receive_transport(data, source, now)
            if kind == messages.MESSAGE_INITIATION:
                return self._receive_initiation(data, source, now)
            if kind == messages.MESSAGE_RESPONSE:
                return self._receive_response(data, source, now)
            if kind == messages.MESSAGE_COOKIE_REPLY:
                return self._receive_cookie_reply(data, now)
            self.counters.unknown_type += 1
            return []
        except Exception:
            # A bug, not a peer's fault; counted so tests and logs see it, never fatal.
            self.counters.internal_error += 1
            return []

    def send_packet(self, packet: bytes, now: float) -> list[Action]:
        """An IP packet read from TUN: encrypt it for the peer that routes its destination."""
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            target = self.allowed_ips.lookup_v4(int.from_bytes(packet[16:20], "big"))
        elif version == 6 and n >= 40:
            target = self.allowed_ips.lookup_v6(int.from_bytes(packet[24:40], "big"))
        else:
            self.counters.bad_ip_packet += 1
            return []
        if target is None:
            self.counters.no_route += 1
            return []
        if target.endpoint is None:
            self.counters.no_endpoint += 1
            return []
        if not target.stage(bytes(packet)):
            self.counters.staged_overflow += 1
        actions: list[Action] = []
        self._send_staged(target, now, actions)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Run the timers due at `now`; call every ~100 ms or at next_deadline()."""
        actions: list[Action] = []
        for p in list(self.peers.values()):
            if p.keepalive_requested:
                p.keepalive_requested = False
                self._send_keepalive(p, now, actions)
            for timer in p.timers.pop_expired(now):
                if p.public_key not in self.peers:
                    break
                self._expiry[timer](self, p, now, actions)
        return actions

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which tick() has work; 0.0 means at once."""
        deadlines = []
        for p in self.peers.values():
            if p.keepalive_requested:
                return 0.0
            d = p.timers.next_deadline()
            if d is not None:
                deadlines.append(d)
        return min(deadlines) if deadlines else None

    # Receiving.

    def _receive_transport(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        n = len(data)
        if n < messages.TRANSPORT_MIN_LEN:
            self.counters.bad_length += 1
            return []
        _, receiver, counter = _HEADER.unpack_from(data)
        entry = self._keypairs.get(receiver)
        if entry is None:
            self.counters.unknown_receiver += 1
            return []
        keypair, p = entry
        config = self.timer_config
        if (
            not keypair.receiving_valid
            or now - keypair.created >= config.reject_after_time
            or counter >= config.reject_after_messages
        ):
            self.counters.key_expired += 1
            return []
        try:
            plain = keypair.receiving.decrypt(
                _NONCE.pack(counter), memoryview(data)[_HEADER_LEN:], None
            )
        except InvalidTag:
            self.counters.bad_aead += 1
            return []
        if not keypair.replay.validate(counter, config.reject_after_messages):
            self.counters.replayed += 1
            return []

        # Authenticated: the peer roams to wherever this came from.
        p.endpoint = source
        p.rx_bytes += n
        self.counters.transport_received += 1
        actions: list[Action] = []
        if p.next is keypair:
            self._confirm_next(p, keypair, now, actions)
        current = p.current
        if (
            current is not None
            and not p.timers.sent_lastminute_handshake
            and current.sending_valid
            and timers.should_rekey_after_receive(current, now, config)
        ):
            p.timers.sent_lastminute_handshake = True
            self._send_initiation(p, now, actions, retry=False)
        p.timers.on_any_authenticated_packet_received(now)
        p.timers.on_any_authenticated_packet_traversal(now)
        if not plain:
            self.counters.keepalives_received += 1
            return actions
        p.timers.on_data_received(now)
        packet = self._check_inner_packet(plain, p)
        if packet is not None:
            self.counters.packets_delivered += 1
            actions.append(DeliverPacket(packet))
        return actions

    def _check_inner_packet(self, plain: bytes, p: Peer) -> bytes | None:
        """The packet without padding if it is IP and its source is one of the peer's."""
        n = len(plain)
        version = plain[0] >> 4
        if version == 4 and n >= 20:
            length = (plain[2] << 8) | plain[3]
            routed = self.allowed_ips.lookup_v4(int.from_bytes(plain[12:16], "big"))
        elif version == 6 and n >= 40:
            length = 40 + ((plain[4] << 8) | plain[5])
            routed = self.allowed_ips.lookup_v6(int.from_bytes(plain[8:24], "big"))
        else:
            self.counters.bad_ip_packet += 1
            return None
        if length > n or (version == 4 and length < 20):
            self.counters.bad_ip_packet += 1
            return None
        if routed is not p:
            self.counters.bad_source_address += 1
            return None
        return plain if length == n else plain[:length]

    def _confirm_next(
        self, p: Peer, keypair: noise.Keypair, now: float, actions: list[Action]
    ) -> None:
        """The initiator used our responder keypair: it becomes current; send what waited."""
        _, dropped = p.received_with_keypair(keypair)
        if dropped is not None:
            self._drop_keypairs([dropped])
        p.timers.on_handshake_complete(now)
        p.last_handshake_wall = self._wall_clock()
        self.counters.handshakes_completed += 1
        self._send_staged(p, now, actions)

    def _macs_ok(self, data: bytes, source: Endpoint, now: float, actions: list[Action]) -> bool:
        """mac1 always; under load, mac2 (else answer with a cookie) and the rate limit."""
        check = self._checker.check(
            data, source, check_mac2=self.under_load, now=now, rng=self._rng
        )
        if check is cookie.MacCheck.INVALID:
            self.counters.bad_mac1 += 1
            return False
        if not self.under_load:
            return True
        if check is cookie.MacCheck.VALID_MAC1:
            self.counters.bad_mac2_needs_cookie += 1
            sender = _TYPE.unpack_from(data, 4)[0]
            reply = self._checker.create_reply(data, sender, source, now=now, rng=self._rng)
            self.counters.cookie_replies_sent += 1
            actions.append(SendDatagram(reply.pack(), source))
            return False
        if not self._ratelimiter.allow(source[0], now):
            self.counters.rate_limited += 1
            return False
        return True

    def _receive_initiation(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        if len(data) != messages.INITIATION_LEN:
            self.counters.bad_length += 1
            return []
        actions: list[Action] = []
        if not self._macs_ok(data, source, now, actions):
            return actions
        identity = self._identity
        if identity is None:
            self.counters.no_identity += 1
            return actions
        message = messages.parse_initiation(data)
        try:
            handshake = noise.consume_initiation(message, identity, self._find_handshake, now=now)
        except noise.HandshakeError as exc:
            self._count(exc.reason)
            return actions
        p = self.peers[handshake.remote_static]
        self.counters.initiations_received += 1
        p.rx_bytes += len(data)
        p.endpoint = source
        self._forget_handshake(p)
        self._send_response(p, now, actions)
        p.timers.on_any_authenticated_packet_received(now)
        p.timers.on_any_authenticated_packet_traversal(now)
        return actions

    def _receive_response(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        if len(data) != messages.RESPONSE_LEN:
            self.counters.bad_length += 1
            return []
        actions: list[Action] = []
        if not self._macs_ok(data, source, now, actions):
            return actions
        identity = self._identity
        if identity is None:
            self.counters.no_identity += 1
            return actions
        message = messages.parse_response(data)
        p = self._handshakes.get(message.receiver)
        if p is None:
            self.counters.unknown_receiver += 1
            return actions
        try:
            noise.consume_response(message, p.handshake, identity)
        except noise.HandshakeError as exc:
            self._count(exc.reason)
            return actions
        self.counters.responses_received += 1
        p.rx_bytes += len(data)
        p.endpoint = source
        self._begin_session(p, now)
        p.timers.on_handshake_complete(now)
        p.last_handshake_wall = self._wall_clock()
        self.counters.handshakes_completed += 1
        p.timers.on_any_authenticated_packet_received(now)
        p.timers.on_any_authenticated_packet_traversal(now)
        # Confirms the session to the responder: queued data if any, else a keepalive.
        self._send_keepalive(p, now, actions)
        return actions

    def _receive_cookie_reply(self, data: bytes, now: float) -> list[Action]:
        if len(data) != messages.COOKIE_REPLY_LEN:
            self.counters.bad_length += 1
            return []
        reply = messages.parse_cookie_reply(data)
        p = self._handshakes.get(reply.receiver)
        if p is None:
            entry = self._keypairs.get(reply.receiver)
            p = entry[1] if entry is not None else None
        if p is None:
            self.counters.unknown_receiver += 1
            return []
        if not p.cookie.consume_reply(reply, now=now):
            self.counters.bad_cookie_reply += 1
            return []
        # The retransmit timer resends the initiation, now with mac2.
        self.counters.cookie_replies_received += 1
        return []

    def _find_handshake(self, static: bytes) -> noise.Handshake | None:
        p = self.peers.get(static)
        return p.handshake if p is not None else None

    # Sending.

    def _send_staged(self, p: Peer, now: float, actions: list[Action]) -> None:
        keypair = p.current
        config = self.timer_config
        if (
            keypair is None
            or not keypair.sending_valid
            or not timers.can_send_with(keypair, now, config)
        ):
            self._send_initiation(p, now, actions, retry=False)
            return
        staged = p.staged
        while staged:
            if keypair.send_counter >= config.reject_after_messages:
                keypair.sending_valid = False
                self._send_initiation(p, now, actions, retry=False)
                return
            self._encrypt(p, keypair, staged.popleft(), now, actions)
        if timers.should_rekey_after_send(keypair, now, config):
            self._send_initiation(p, now, actions, retry=False)

    def _encrypt(
        self, p: Peer, keypair: noise.Keypair, packet: bytes, now: float, actions: list[Action]
    ) -> None:
        n = len(packet)
        pad = -n % 16
        if pad:
            if n + pad > self.mtu:
                pad = max(0, self.mtu - n)
            packet += bytes(pad)
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        data = _HEADER.pack(_TRANSPORT, keypair.remote_index, counter) + keypair.sending.encrypt(
            _NONCE.pack(counter), packet, None
        )
        t = p.timers
        t.on_any_authenticated_packet_traversal(now)
        t.on_any_authenticated_packet_sent(now)
        if n:
            self.counters.transport_sent += 1
            t.on_data_sent(now)
        else:
            self.counters.keepalives_sent += 1
        self._emit(p, data, actions)

    def _emit(self, p: Peer, data: bytes, actions: list[Action]) -> None:
        endpoint = p.endpoint
        if endpoint is None:
            self.counters.no_endpoint += 1
            return
        p.tx_bytes += len(data)
        actions.append(SendDatagram(data, endpoint))

    def _send_keepalive(self, p: Peer, now: float, actions: list[Action]) -> None:
        if not p.staged:
            p.staged.append(b"")
        self._send_staged(p, now, actions)

    def _send_initiation(self, p: Peer, now: float, actions: list[Action], *, retry: bool) -> None:
        if not retry:
            p.timers.handshake_attempts = 0
        last = p.last_sent_handshake
        if last is not None and now - last < self.timer_config.rekey_timeout:
            return  # one initiation per rekey-timeout at most
        identity = self._identity
        if identity is None:
            self.counters.no_identity += 1
            return
        p.last_sent_handshake = now
        self._forget_handshake(p)
        index = self._new_index()
        try:
            message = noise.create_initiation(
                p.handshake,
                identity,
                ephemeral_private=self._rng(noise.KEY_LEN),
                sender_index=index,
                wall_time=self._wall_clock(),
            )
        except noise.HandshakeError as exc:
            self._count(exc.reason)
            return
        p.handshake_index = index
        self._handshakes[index] = p
        data = p.cookie.stamp(message.pack(), now=now)
        p.timers.on_any_authenticated_packet_traversal(now)
        p.timers.on_any_authenticated_packet_sent(now)
        self.counters.initiations_sent += 1
        self._emit(p, data, actions)
        p.timers.on_handshake_initiated(now)

    def _send_response(self, p: Peer, now: float, actions: list[Action]) -> None:
        index = self._new_index()
        try:
            message = noise.create_response(
                p.handshake, ephemeral_private=self._rng(noise.KEY_LEN), sender_index=index
            )
        except noise.HandshakeError as exc:
            self._count(exc.reason)
            return
        data = p.cookie.stamp(message.pack(), now=now)
        self._begin_session(p, now)
        p.timers.on_any_authenticated_packet_traversal(now)
        p.timers.on_any_authenticated_packet_sent(now)
        p.last_sent_handshake = now
        self.counters.responses_sent += 1
        self._emit(p, data, actions)

    # Index table and keypairs.

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index not in self._handshakes and index not in self._keypairs:
                return index

    def _forget_handshake(self, p: Peer) -> None:
        """Retire the index of the handshake in flight (its state is replaced or wiped)."""
        index = p.handshake_index
        if index is not None:
            if self._handshakes.get(index) is p:
                del self._handshakes[index]
            p.handshake_index = None

    def _begin_session(self, p: Peer, now: float) -> None:
        keypair = noise.begin_session(p.handshake, now=now)
        self._forget_handshake(p)
        self._keypairs[keypair.local_index] = (keypair, p)
        self._drop_keypairs(p.install_keypair(keypair))
        p.timers.on_session_derived(now)

    def _drop_keypairs(self, keypairs: list[noise.Keypair]) -> None:
        for keypair in keypairs:
            keypair.sending_valid = keypair.receiving_valid = False
            entry = self._keypairs.get(keypair.local_index)
            if entry is not None and entry[0] is keypair:
                del self._keypairs[keypair.local_index]

    def _count(self, reason: str) -> None:
        setattr(self.counters, reason, getattr(self.counters, reason) + 1)

    # Timer expiries, dispatched from tick().

    def _expired_retransmit_handshake(self, p: Peer, now: float, actions: list[Action]) -> None:
        if p.timers.expired_retransmit_handshake(now):
            self._send_initiation(p, now, actions, retry=True)
            return
        # Gave up: what waited for this session will not be sent.
        self.counters.staged_given_up += len(p.staged)
        p.staged.clear()

    def _expired_send_keepalive(self, p: Peer, now: float, actions: list[Action]) -> None:
        self._send_keepalive(p, now, actions)
        p.timers.expired_send_keepalive(now)

    def _expired_new_handshake(self, p: Peer, now: float, actions: list[Action]) -> None:
        # We sent data and heard nothing back for keepalive + rekey timeout.
        self._send_initiation(p, now, actions, retry=False)

    def _expired_zero_key_material(self, p: Peer, now: float, actions: list[Action]) -> None:
        self._forget_handshake(p)
        p.handshake.clear()
        self._drop_keypairs(p.clear_keypairs())
        self.counters.keys_zeroed += 1

    def _expired_send_persistent_keepalive(
        self, p: Peer, now: float, actions: list[Action]
    ) -> None:
        if p.persistent_keepalive_interval:
            self._send_keepalive(p, now, actions)

    _expiry: dict[timers.Timer, Callable[[Device, Peer, float, list[Action]], None]] = {
        timers.Timer.RETRANSMIT_HANDSHAKE: _expired_retransmit_handshake,
        timers.Timer.SEND_KEEPALIVE: _expired_send_keepalive,
        timers.Timer.NEW_HANDSHAKE: _expired_new_handshake,
        timers.Timer.ZERO_KEY_MATERIAL: _expired_zero_key_material,
        timers.Timer.SEND_PERSISTENT_KEEPALIVE: _expired_send_persistent_keepalive,
    }
