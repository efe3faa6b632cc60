"""Message formats: sizes and fields of the four messages; the receive path's dispatch on type
and length; and total parsing of the handshake messages."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podwire.agent.engine import constants, device, messages
from podwire.agent.engine.counters import Drop

PARSERS: dict[int, Callable[[bytes], Any]] = {
    constants.MESSAGE_INITIATION: messages.parse_initiation,
    constants.MESSAGE_RESPONSE: messages.parse_response,
    constants.MESSAGE_COOKIE_REPLY: messages.parse_cookie_reply,
}


def test_pack_and_parse_each_message() -> None:
    init = messages.Initiation(7, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    resp = messages.Response(8, 7, b"e" * 32, b"n" * 16, b"1" * 16, b"2" * 16)
    reply = messages.CookieReply(9, b"n" * 24, b"c" * 32)
    header = messages.TRANSPORT_HEADER.pack(constants.MESSAGE_TRANSPORT, 10, 2**64 - 1)
    assert [len(m.pack()) for m in (init, resp, reply)] == [148, 92, 64]
    assert len(header) == constants.TRANSPORT_HEADER_LEN == 16
    assert messages.parse_initiation(init.pack()) == init
    assert messages.parse_response(resp.pack()) == resp
    assert messages.parse_cookie_reply(reply.pack()) == reply
    # The type is a little-endian u32 with three zero bytes; indexes and counters are LE too.
    assert init.pack()[:8] == bytes([1, 0, 0, 0, 7, 0, 0, 0])
    assert header[:8] == bytes([4, 0, 0, 0, 10, 0, 0, 0])
    assert header[8:16] == b"\xff" * 8


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Drop.SHORT),
        (b"\x01\x00\x00", Drop.SHORT),
        (b"\x05\x00\x00\x00" + bytes(60), Drop.UNKNOWN_TYPE),
        (b"\x01\x00\x00\x01" + bytes(144), Drop.UNKNOWN_TYPE),  # reserved bytes not zero
        (b"\x01\x00\x00\x00" + bytes(143), Drop.BAD_LENGTH),
        (b"\x02\x00\x00\x00" + bytes(89), Drop.BAD_LENGTH),
        (b"\x03\x00\x00\x00" + bytes(61), Drop.BAD_LENGTH),
        (b"\x04\x00\x00\x00" + bytes(27), Drop.BAD_LENGTH),
    ],
)
def test_the_receive_path_drops_malformed_datagrams_by_type_and_length(
    data: bytes, reason: Drop, rng_factory: Any
) -> None:
    dev = device.Device(rng=rng_factory(1), wall_clock=lambda: 0.0)
    assert dev.receive_datagram(data, ("192.0.2.1", 1), 0.0) == []
    assert {r: n for r, n in dev.counters.drops.items() if n} == {reason: 1}


@pytest.mark.parametrize(
    ("kind", "data", "reason"),
    [
        (constants.MESSAGE_INITIATION, b"", Drop.UNKNOWN_TYPE),
        (constants.MESSAGE_INITIATION, b"\x02\x00\x00\x00" + bytes(144), Drop.UNKNOWN_TYPE),
        (constants.MESSAGE_INITIATION, b"\x01\x00\x00\x00" + bytes(143), Drop.BAD_LENGTH),
        (constants.MESSAGE_RESPONSE, b"\x02\x00\x00\x00" + bytes(89), Drop.BAD_LENGTH),
        (constants.MESSAGE_COOKIE_REPLY, b"\x03\x00\x00\x00" + bytes(61), Drop.BAD_LENGTH),
    ],
)
def test_malformed_handshake_messages_are_typed_errors(
    kind: int, data: bytes, reason: Drop
) -> None:
    with pytest.raises(messages.MessageError) as err:
        PARSERS[kind](data)
    assert err.value.reason is reason


@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=300))
def test_parsing_raises_nothing_but_message_error(kind: int, data: bytes) -> None:
    with contextlib.suppress(messages.MessageError):
        PARSERS[kind](data)


@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=200))
def test_parsing_typed_garbage_is_total(kind: int, rest: bytes) -> None:
    data = bytes([kind, 0, 0, 0]) + rest
    try:
        parsed = PARSERS[kind](data)
    except messages.MessageError:
        return
    assert parsed.pack() == data
