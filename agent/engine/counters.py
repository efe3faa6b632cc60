"""What the device counts: everything it drops, by reason, and what it handled.

Nothing a peer sends makes the device raise: a malformed, unauthenticated or unwanted datagram
is dropped and counted here, and so is a packet from TUN that cannot be sent. The I/O loop
logs the counts. A reason is a `Drop`, so a misspelt reason fails at once instead of starting
a new counter; its value is the name the logs report.
"""

from __future__ import annotations

import dataclasses
import enum


class Drop(enum.Enum):
    # Counting a drop hashes its reason, once per garbage datagram in a flood: members are
    # singletons, so identity's hash serves, at half the cost of Enum's hash of the name.
    __hash__ = object.__hash__

    # A datagram from UDP.
    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    BAD_LENGTH = "bad_length"
    BAD_MAC1 = "bad_mac1"
    BAD_MAC2_NEEDS_COOKIE = "bad_mac2_needs_cookie"
    RATE_LIMITED = "rate_limited"
    NO_IDENTITY = "no_identity"
    NO_PEER = "no_peer"
    BAD_AEAD = "bad_aead"
    BAD_DH = "bad_dh"
    BAD_STATE = "bad_state"
    STALE_TIMESTAMP = "stale_timestamp"
    FLOOD = "flood"
    UNKNOWN_RECEIVER = "unknown_receiver"
    BAD_COOKIE_REPLY = "bad_cookie_reply"
    KEY_EXPIRED = "key_expired"
    REPLAYED = "replayed"
    BAD_IP_PACKET = "bad_ip_packet"
    BAD_SOURCE_ADDRESS = "bad_source_address"
    INTERNAL_ERROR = "internal_error"
    # A packet from TUN.
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    ROUTING_LOOP = "routing_loop"
    STAGED_OVERFLOW = "staged_overflow"
    STAGED_GIVEN_UP = "staged_given_up"


def _no_drops() -> dict[Drop, int]:
    return dict.fromkeys(Drop, 0)


@dataclasses.dataclass
class Counters:
    """Drops by reason, then what was handled. Field names are stable: the I/O layer logs them."""

    drops: dict[Drop, int] = dataclasses.field(default_factory=_no_drops)
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
    # handshake messages answered or consumed with the previous key, in its grace
    previous_key_handshakes: int = 0
    keys_zeroed: int = 0

    def as_dict(self) -> dict[str, int]:
        """Every counter by its log name: the drop reasons' values, then the handled ones."""
        counts = {reason.value: n for reason, n in self.drops.items()}
        for field in dataclasses.fields(self):
            if field.name != "drops":
                counts[field.name] = getattr(self, field.name)
        return counts
