"""The timer state machine of paper section 6, as plain per-peer state.

Nothing here sleeps or reads a clock: hooks take `now` (monotonic seconds) and set or cancel
deadlines; the device's tick (in `expiry`) asks `pop_expired(now)` which timers fired and acts
on them. The hooks are named for the event that calls them and the expiries for the timer that
fired, so the device's send and receive paths read like the paper's rules. The numbers in force
are a `ProtocolTimers`: the specification's (from `constants`) unless a test shortens them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Protocol

from podwire.agent.engine import constants

# After the device's private key changes, the previous key is still answered for this long
# (podwire's choice, not the paper's): as long as a session made with it may live, so a peer
# that has not yet learnt the new key keeps rekeying with the old one and loses nothing.
PREVIOUS_KEY_GRACE = constants.REJECT_AFTER_TIME
# Jitters drawn from the random source at once (four bytes each).
JITTER_DRAWS = 16


@dataclasses.dataclass(frozen=True)
class ProtocolTimers:
    """The timers and limits of paper section 6.1 in force, in seconds and messages, and the
    previous key's grace."""

    rekey_after_messages: int = constants.REKEY_AFTER_MESSAGES
    reject_after_messages: int = constants.REJECT_AFTER_MESSAGES
    rekey_after_time: float = constants.REKEY_AFTER_TIME
    reject_after_time: float = constants.REJECT_AFTER_TIME
    rekey_attempt_time: float = constants.REKEY_ATTEMPT_TIME
    rekey_timeout: float = constants.REKEY_TIMEOUT
    rekey_timeout_jitter: float = constants.REKEY_TIMEOUT_JITTER_MAX
    keepalive_timeout: float = constants.KEEPALIVE_TIMEOUT
    previous_key_grace: float = PREVIOUS_KEY_GRACE

    @property
    def max_timer_handshakes(self) -> int:
        return int(self.rekey_attempt_time // self.rekey_timeout)

    @property
    def zero_key_material_after(self) -> float:
        return self.reject_after_time * 3


class Timer(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    SEND_PERSISTENT_KEEPALIVE = "send_persistent_keepalive"


class KeyAge(Protocol):
    created: float
    send_counter: int
    i_am_the_initiator: bool


class PeerTimers:
    """Deadlines (monotonic seconds, None when not armed) and counters for one peer."""

    def __init__(self, config: ProtocolTimers, rng: Callable[[int], bytes]) -> None:
        self.config = config
        self._rng = rng
        self._jitter = b""
        self.retransmit_handshake_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_key_material_at: float | None = None
        self.send_persistent_keepalive_at: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_lastminute_handshake = False
        self.persistent_keepalive_interval = 0

    def jitter(self) -> float:
        """Up to rekey_timeout_jitter seconds, so peers' retries do not fall in step.

        Drawn from JITTER_DRAWS at a time: the first packet sent after an answer takes one
        (new_handshake_at), and a system call for four random bytes each time showed in the
        round trip of a lone packet."""
        if not self._jitter:
            self._jitter = self._rng(4 * JITTER_DRAWS)
        drawn, self._jitter = self._jitter[:4], self._jitter[4:]
        return int.from_bytes(drawn, "little") / 2**32 * self.config.rekey_timeout_jitter

    # Hooks, called by the device when the event happens.

    def on_data_sent(self, now: float) -> None:
        # Expect an answer within keepalive + rekey timeout, else start a new handshake.
        if self.new_handshake_at is None:
            c = self.config
            self.new_handshake_at = now + c.keepalive_timeout + c.rekey_timeout + self.jitter()

    def on_data_received(self, now: float) -> None:
        # Answer data with a keepalive if we send nothing else in time.
        if self.send_keepalive_at is None:
            self.send_keepalive_at = now + self.config.keepalive_timeout
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self, now: float) -> None:
        self.send_keepalive_at = None

    def on_any_authenticated_packet_received(self, now: float) -> None:
        self.new_handshake_at = None

    def on_any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval:
            self.send_persistent_keepalive_at = now + self.persistent_keepalive_interval

    def on_handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake_at = now + self.config.rekey_timeout + self.jitter()

    def on_handshake_complete(self, now: float) -> None:
        self.retransmit_handshake_at = None
        self.handshake_attempts = 0
        self.sent_lastminute_handshake = False

    def on_session_derived(self, now: float) -> None:
        self.zero_key_material_at = now + self.config.zero_key_material_after

    # Expiries: the device calls these from tick when the timer has fired.

    def expired_retransmit_handshake(self, now: float) -> bool:
        """True to send another initiation; False when retrying has run out of time, in
        which case the caller drops the queued packets and keys are zeroed later."""
        if self.handshake_attempts > self.config.max_timer_handshakes:
            self.send_keepalive_at = None
            if self.zero_key_material_at is None:
                self.zero_key_material_at = now + self.config.zero_key_material_after
            return False
        self.handshake_attempts += 1
        return True

    def expired_send_keepalive(self, now: float) -> None:
        """Call after sending the keepalive: data that arrived meanwhile needs another."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.send_keepalive_at = now + self.config.keepalive_timeout

    def stop(self) -> None:
        """Disarm everything (peer removed, or its keys zeroed)."""
        self.retransmit_handshake_at = None
        self.send_keepalive_at = None
        self.new_handshake_at = None
        self.zero_key_material_at = None
        self.send_persistent_keepalive_at = None

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.retransmit_handshake_at,
                self.send_keepalive_at,
                self.new_handshake_at,
                self.zero_key_material_at,
                self.send_persistent_keepalive_at,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def pop_expired(self, now: float) -> list[Timer]:
        """The timers due at `now`, disarmed, in the order the device should run them."""
        fired = []
        if self.retransmit_handshake_at is not None and self.retransmit_handshake_at <= now:
            self.retransmit_handshake_at = None
            fired.append(Timer.RETRANSMIT_HANDSHAKE)
        if self.send_keepalive_at is not None and self.send_keepalive_at <= now:
            self.send_keepalive_at = None
            fired.append(Timer.SEND_KEEPALIVE)
        if self.new_handshake_at is not None and self.new_handshake_at <= now:
            self.new_handshake_at = None
            fired.append(Timer.NEW_HANDSHAKE)
        if (
            self.send_persistent_keepalive_at is not None
            and self.send_persistent_keepalive_at <= now
        ):
            self.send_persistent_keepalive_at = None
            fired.append(Timer.SEND_PERSISTENT_KEEPALIVE)
        if self.zero_key_material_at is not None and self.zero_key_material_at <= now:
            self.zero_key_material_at = None
            fired.append(Timer.ZERO_KEY_MATERIAL)
        return fired


# The key-age rules of section 6.2, as predicates the send and receive paths ask.


def can_send_with(keypair: KeyAge, now: float, config: ProtocolTimers) -> bool:
    """Keys older than reject-after-time, or used up, are never used."""
    return (
        now - keypair.created < config.reject_after_time
        and keypair.send_counter < config.reject_after_messages
    )


def should_rekey_after_send(keypair: KeyAge, now: float, config: ProtocolTimers) -> bool:
    """After sending: too many messages on this key, or (initiator only) the key is old."""
    return keypair.send_counter > config.rekey_after_messages or (
        keypair.i_am_the_initiator and now - keypair.created >= config.rekey_after_time
    )


def should_rekey_after_receive(keypair: KeyAge, now: float, config: ProtocolTimers) -> bool:
    """After receiving data: an initiator whose key nears reject-after-time rekeys at once, so
    that the session survives even if it has nothing to send (the "last minute" handshake)."""
    c = config
    return keypair.i_am_the_initiator and now - keypair.created >= (
        c.reject_after_time - c.keepalive_timeout - c.rekey_timeout
    )
