"""WireGuard's message formats on the wire (paper section 5.4), packed and parsed.

The receive path reads a datagram's type and checks its length, then parses a handshake
message here; parsing is total all the same: any byte string yields a typed message or a
`MessageError`, never another exception. The transport path is hot, so it has no message
object: its header is a precompiled `struct.Struct` that the send and receive paths use
directly. The types and sizes are the specification's, in `constants`.
"""

from __future__ import annotations

import dataclasses
import struct

from podwire.agent.engine import constants
from podwire.agent.engine.counters import Drop

# The type is one byte followed by three zero bytes; read as a little-endian u32, as the
# kernel and wireguard-go do, nonzero reserved bytes make the type unknown.
TYPE = struct.Struct("<I")
# type, receiver index, counter
TRANSPORT_HEADER = struct.Struct("<IIQ")
# A transport message's AEAD nonce: 32 zero bits, then the counter, little-endian.
TRANSPORT_NONCE = struct.Struct("<4xQ")
_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")

assert _INITIATION.size == constants.INITIATION_LEN
assert _RESPONSE.size == constants.RESPONSE_LEN
assert _COOKIE_REPLY.size == constants.COOKIE_REPLY_LEN
assert TRANSPORT_HEADER.size == constants.TRANSPORT_HEADER_LEN

_NO_MAC = bytes(constants.MAC_LEN)


class MessageError(ValueError):
    """A datagram is not a well-formed WireGuard message; `reason` is the drop to count."""

    def __init__(self, reason: Drop, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = _NO_MAC
    mac2: bytes = _NO_MAC

    def pack(self) -> bytes:
        return _INITIATION.pack(
            constants.MESSAGE_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = _NO_MAC
    mac2: bytes = _NO_MAC

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            constants.MESSAGE_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(
            constants.MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


def _check_length(data: bytes, kind: int, expected: int) -> None:
    if len(data) < 4 or TYPE.unpack_from(data)[0] != kind:
        raise MessageError(Drop.UNKNOWN_TYPE, f"not a message of type {kind}")
    if len(data) != expected:
        raise MessageError(
            Drop.BAD_LENGTH, f"type {kind} message has {len(data)} bytes, expected {expected}"
        )


def parse_initiation(data: bytes) -> Initiation:
    _check_length(data, constants.MESSAGE_INITIATION, constants.INITIATION_LEN)
    _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
    return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)


def parse_response(data: bytes) -> Response:
    _check_length(data, constants.MESSAGE_RESPONSE, constants.RESPONSE_LEN)
    _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(data)
    return Response(sender, receiver, ephemeral, nothing, mac1, mac2)


def parse_cookie_reply(data: bytes) -> CookieReply:
    _check_length(data, constants.MESSAGE_COOKIE_REPLY, constants.COOKIE_REPLY_LEN)
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    return CookieReply(receiver, nonce, cookie)
