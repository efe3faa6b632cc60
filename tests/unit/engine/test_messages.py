"""Message formats: sizes and fields of the four messages, and total parsing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podwire.agent.engine import messages


def test_pack_and_parse_each_message() -> None:
    init = messages.Initiation(7, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    resp = messages.Response(8, 7, b"e" * 32, b"n" * 16, b"1" * 16, b"2" * 16)
    reply = messages.CookieReply(9, b"n" * 24, b"c" * 32)
    data = messages.Transport(10, 2**64 - 1, b"x" * 40)
    assert [len(m.pack()) for m in (init, resp, reply, data)] == [148, 92, 64, 56]
    for message in (init, resp, reply, data):
        assert messages.parse(message.pack()) == message
    # The type is a little-endian u32 with three zero bytes; indexes and counters are LE too.
    assert init.pack()[:8] == bytes([1, 0, 0, 0, 7, 0, 0, 0])
    assert data.pack()[8:16] == b"\xff" * 8


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\x01\x00\x00", "short"),
        (b"\x05\x00\x00\x00" + bytes(60), "unknown_type"),
        (b"\x01\x00\x00\x01" + bytes(144), "unknown_type"),  # reserved bytes not zero
        (b"\x01\x00\x00\x00" + bytes(143), "bad_length"),
        (b"\x02\x00\x00\x00" + bytes(89), "bad_length"),
        (b"\x03\x00\x00\x00" + bytes(61), "bad_length"),
        (b"\x04\x00\x00\x00" + bytes(27), "bad_length"),
    ],
)
def test_malformed_datagrams_are_typed_errors(data: bytes, reason: str) -> None:
    with pytest.raises(messages.MessageError) as err:
        messages.parse(data)
    assert err.value.reason == reason


@given(st.binary(max_size=300))
def test_parse_raises_nothing_but_message_error(data: bytes) -> None:
    with contextlib.suppress(messages.MessageError):
        messages.parse(data)


@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=200))
def test_parse_of_typed_garbage_is_total(kind: int, rest: bytes) -> None:
    try:
        parsed = messages.parse(bytes([kind, 0, 0, 0]) + rest)
    except messages.MessageError:
        return
    assert parsed.pack() == bytes([kind, 0, 0, 0]) + rest
