"""Per-peer state: configuration the UAPI layer sets, the handshake, the keypairs, the packets
waiting for a session, the roaming endpoint and the traffic counters.

Keypairs rotate as in the kernel: `current` sends; `previous` still receives the packets in
flight from before a rekey; `next` is a responder's fresh keypair, which it may not send with
until the initiator proves it has it too by sending data with it (section 5.4.5).
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Iterator

from podwire.agent.engine import constants, cookie, noise, timers
from podwire.agent.engine.actions import Endpoint

# Implementation constant: packets held while a handshake is in progress (the kernel's).
MAX_STAGED_PACKETS = 128
# Set above an IPv6 address's 128 bits, so that no IPv4 address (as an int) equals an IPv6 one.
IPV6_TAG = 1 << 128


def endpoint_address(endpoint: Endpoint) -> int:
    """The endpoint's address as the send path compares destinations (-1: not an address)."""
    try:
        address = ipaddress.ip_address(endpoint[0].partition("%")[0])
    except ValueError:
        return -1
    if isinstance(address, ipaddress.IPv6Address):
        return int(address) | IPV6_TAG
    return int(address)


class Peer:
    def __init__(
        self,
        public_key: bytes,
        *,
        timer_config: timers.ProtocolTimers,
        rng: Callable[[int], bytes],
    ) -> None:
        if len(public_key) != constants.KEY_LEN:
            raise ValueError(f"a public key has 32 bytes, not {len(public_key)}")
        self._public_key = bytes(public_key)
        self.handshake = noise.Handshake(self._public_key)
        self.cookie = cookie.CookieGenerator(self._public_key)
        self.timers = timers.PeerTimers(timer_config, rng)
        self.current: noise.Keypair | None = None
        self.previous: noise.Keypair | None = None
        self.next: noise.Keypair | None = None
        # the local index our in-flight handshake message announced, while it is in flight
        self.handshake_index: int | None = None
        self.staged: collections.deque[bytes] = collections.deque()
        self.endpoint: Endpoint | None = None
        # The endpoint's address, kept for the send path's routing-loop check; worked out
        # again only when the endpoint changes (it is assigned on every datagram received).
        self.endpoint_seen: Endpoint | None = None
        self.endpoint_address = -1
        self.routing_loops = 0
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall: float | None = None
        self.last_sent_handshake: float | None = None
        # set when a persistent keepalive is switched on; the device's next tick sends one
        self.keepalive_requested = False
        # set when the peer is renamed; the device's next tick initiates a handshake
        self.handshake_requested = False

    @property
    def public_key(self) -> bytes:
        return self._public_key

    def rename(self, public_key: bytes) -> None:
        """The peer's key rotated: everything it has (sessions, endpoint, counters) stays and
        its handshake and macs address the new key. The device keeps the lookups in step."""
        if len(public_key) != constants.KEY_LEN:
            raise ValueError(f"a public key has 32 bytes, not {len(public_key)}")
        self._public_key = bytes(public_key)
        self.handshake.remote_static = self._public_key
        self.cookie.retarget(self._public_key)

    @property
    def preshared_key(self) -> bytes:
        """32 zero bytes when none; takes effect at the next handshake."""
        return self.handshake.preshared_key

    @preshared_key.setter
    def preshared_key(self, key: bytes) -> None:
        if len(key) != constants.KEY_LEN:
            raise ValueError(f"a preshared key has 32 bytes, not {len(key)}")
        self.handshake.preshared_key = bytes(key)

    @property
    def persistent_keepalive_interval(self) -> int:
        """Seconds between keepalives sent even when idle; 0 is off."""
        return self.timers.persistent_keepalive_interval

    @persistent_keepalive_interval.setter
    def persistent_keepalive_interval(self, seconds: int) -> None:
        if not 0 <= seconds <= 0xFFFF:
            raise ValueError(f"persistent keepalive interval {seconds} is not in 0..65535")
        if seconds and not self.timers.persistent_keepalive_interval:
            self.keepalive_requested = True
        if not seconds:
            self.timers.send_persistent_keepalive_at = None
        self.timers.persistent_keepalive_interval = seconds

    def see_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoint_seen = endpoint
        self.endpoint_address = endpoint_address(endpoint)

    def keypairs(self) -> Iterator[noise.Keypair]:
        for keypair in (self.current, self.previous, self.next):
            if keypair is not None:
                yield keypair

    def install_keypair(self, keypair: noise.Keypair) -> list[noise.Keypair]:
        """Slot in a fresh keypair; returns the keypairs it displaced (their indexes are free)."""
        dropped = []
        if keypair.i_am_the_initiator:
            if self.next is not None:
                # An unconfirmed next is kept as previous: its initiator may still use it.
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            dropped.extend(k for k in (self.next, self.previous) if k is not None)
            self.next, self.previous = keypair, None
        return dropped

    def received_with_keypair(self, keypair: noise.Keypair) -> tuple[bool, noise.Keypair | None]:
        """Call on every authenticated transport packet. Returns whether it confirmed `next`
        (which then becomes current) and the previous keypair that this rotation dropped."""
        if keypair is not self.next:
            return False, None
        dropped = self.previous
        self.previous, self.current, self.next = self.current, keypair, None
        return True, dropped

    def clear_keypairs(self) -> list[noise.Keypair]:
        dropped = list(self.keypairs())
        self.current = self.previous = self.next = None
        return dropped

    def expire_current_keypairs(self) -> None:
        """Stop sending with the current keys; the next send starts a handshake at once."""
        self.last_sent_handshake = None
        for keypair in (self.current, self.next):
            if keypair is not None:
                keypair.sending_valid = False

    def stage(self, packet: bytes) -> bool:
        """Queue a packet until a session exists; False if the oldest had to be dropped."""
        self.staged.append(packet)
        if len(self.staged) > MAX_STAGED_PACKETS:
            self.staged.popleft()
            return False
        return True

    def __repr__(self) -> str:
        return f"Peer({self._public_key.hex()[:8]}…)"
