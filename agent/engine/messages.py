"""WireGuard's four message formats on the wire (paper section 5.4), packed and parsed.

Everything a peer sends us passes through here first, so parsing is total: any byte string
yields a typed message or a `MessageError`, never another exception. The transport path is hot,
so its header is also exposed as a precompiled `struct.Struct` for the device to use directly.
"""

from __future__ import annotations

import dataclasses
import struct

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TIMESTAMP_LEN = 12
COOKIE_NONCE_LEN = 24

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive: empty payload, tag only

# The type is one byte followed by three zero bytes; read as a little-endian u32, as the
# kernel and wireguard-go do, nonzero reserved bytes make the type unknown.
TYPE = struct.Struct("<I")
# type, receiver index, counter
TRANSPORT_HEADER = struct.Struct("<IIQ")
_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")

assert _INITIATION.size == INITIATION_LEN
assert _RESPONSE.size == RESPONSE_LEN
assert _COOKIE_REPLY.size == COOKIE_REPLY_LEN


class MessageError(ValueError):
    """A datagram is not a well-formed WireGuard message. `reason` names the counter to bump."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)

    def pack(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION,
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
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
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
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Transport:
    receiver: int
    counter: int
    encrypted_packet: bytes

    def pack(self) -> bytes:
        return (
            TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.receiver, self.counter)
            + self.encrypted_packet
        )


Message = Initiation | Response | CookieReply | Transport


def message_type(data: bytes) -> int:
    """The type of a datagram; raises MessageError if it is too short to have one."""
    if len(data) < 4:
        raise MessageError("short", f"datagram of {len(data)} bytes has no message type")
    return int(TYPE.unpack_from(data)[0])


def parse(data: bytes) -> Message:
    """Parse any datagram; the single entry point for untrusted bytes."""
    kind = message_type(data)
    if kind == MESSAGE_INITIATION:
        return parse_initiation(data)
    if kind == MESSAGE_RESPONSE:
        return parse_response(data)
    if kind == MESSAGE_COOKIE_REPLY:
        return parse_cookie_reply(data)
    if kind == MESSAGE_TRANSPORT:
        return parse_transport(data)
    raise MessageError("unknown_type", f"unknown message type {kind:#x}")


def _check_length(data: bytes, kind: int, expected: int) -> None:
    if len(data) < 4 or TYPE.unpack_from(data)[0] != kind:
        raise MessageError("unknown_type", f"not a message of type {kind}")
    if len(data) != expected:
        raise MessageError(
            "bad_length", f"type {kind} message has {len(data)} bytes, expected {expected}"
        )


def parse_initiation(data: bytes) -> Initiation:
    _check_length(data, MESSAGE_INITIATION, INITIATION_LEN)
    _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
    return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)


def parse_response(data: bytes) -> Response:
    _check_length(data, MESSAGE_RESPONSE, RESPONSE_LEN)
    _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(data)
    return Response(sender, receiver, ephemeral, nothing, mac1, mac2)


def parse_cookie_reply(data: bytes) -> CookieReply:
    _check_length(data, MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN)
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    return CookieReply(receiver, nonce, cookie)


def parse_transport(data: bytes) -> Transport:
    if len(data) < 4 or TYPE.unpack_from(data)[0] != MESSAGE_TRANSPORT:
        raise MessageError("unknown_type", "not a transport message")
    if len(data) < TRANSPORT_MIN_LEN:
        raise MessageError(
            "bad_length", f"transport message of {len(data)} bytes, minimum {TRANSPORT_MIN_LEN}"
        )
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    return Transport(receiver, counter, bytes(data[TRANSPORT_HEADER_LEN:]))
