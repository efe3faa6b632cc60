"""The data path's per-segment loops, a batch at a time: sealing, opening, cutting TSO packets.

A profile (bench/segment_costs.py) showed Python's own work per 1,400-byte segment bounding the
engine: cutting a TSO packet into segments, sealing each, opening each. Each has two
implementations behind one API: the C extension podwire.agent.engine._fastpath (OpenSSL's
ChaCha20-Poly1305, built by `pip install` when a compiler and libssl-dev are there) and the
pure-Python code here. They produce the same bytes and refuse the same input
(tests/unit/engine/test_fastpath.py); which one is in force is decided once at start-up:
native when the extension imports, unless PODWIRE_ENGINE_NATIVE=off asks for pure Python.

The protocol's state stays with its owners: counters on the keypair (send.py), the replay
window and timers (receive.py); these functions only transform bytes. Pure: no I/O, no clock.
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from podwire.agent.engine import constants, offload

Buffer: TypeAlias = bytes | bytearray | memoryview
# What a keypair keeps per direction for `seal` and `open`: the key itself (native), or the
# AEAD object built once from it (pure Python).
Cipher: TypeAlias = Any

ENV = "PODWIRE_ENGINE_NATIVE"
NATIVE_NAME = "native_fastpath"
PYTHON_NAME = "python_fastpath"

_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")
_HEADER_LEN = constants.TRANSPORT_HEADER_LEN
_MIN_LEN = constants.TRANSPORT_MIN_LEN
_TRANSPORT = constants.MESSAGE_TRANSPORT
_PADDING = constants.PADDING_MULTIPLE


def _load_native() -> tuple[ModuleType | None, str]:
    """The extension, or None and why not."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return None, f"{ENV}=off"
    try:
        return importlib.import_module("podwire.agent.engine._fastpath"), ""
    except ImportError as exc:
        return None, f"the extension is not built ({exc})"


_native, unavailable_reason = _load_native()


# The pure-Python implementations.


def _cipher_py(key: bytes) -> Cipher:
    return ChaCha20Poly1305(key)


def _seal_py(
    cipher: Cipher, receiver: int, counter: int, packets: Sequence[Buffer], mtu: int
) -> list[bytes]:
    encrypt = cipher.encrypt
    pack_header, pack_nonce = _HEADER.pack, _NONCE.pack
    sealed = []
    for index, packet in enumerate(packets):
        n = len(packet)
        pad = -n % _PADDING
        if pad:
            if n + pad > mtu:
                pad = max(0, mtu - n)
            packet = bytes(packet) + bytes(pad)
        c = counter + index
        sealed.append(pack_header(_TRANSPORT, receiver, c) + encrypt(pack_nonce(c), packet, None))
    return sealed


def _split_tcp_py(packet: bytes, mss: int, v6: bool) -> list[bytes]:
    return offload.split_tcp(packet, mss, v6=v6)


def _open_py(ciphers: Sequence[Cipher], datagrams: Sequence[Buffer]) -> list[bytes | None]:
    if len(ciphers) != len(datagrams):
        raise ValueError("one key per datagram")
    opened: list[bytes | None] = []
    for cipher, data in zip(ciphers, datagrams, strict=True):
        if len(data) < _MIN_LEN:
            opened.append(None)
            continue
        counter = int.from_bytes(data[8:16], "little")
        try:
            opened.append(
                cipher.decrypt(_NONCE.pack(counter), memoryview(data)[_HEADER_LEN:], None)
            )
        except InvalidTag:
            opened.append(None)
    return opened


# The API: what is in force, and the functions, bound by select().

name = PYTHON_NAME
# A transport-message key made into what seal and open take; built once per keypair.
cipher: Callable[[bytes], Cipher] = _cipher_py
# seal(cipher, receiver, counter, packets, mtu): the transport messages for packets under
# counters counter, counter + 1, ..., each padded to 16 bytes but not beyond mtu.
seal: Callable[[Cipher, int, int, Sequence[Buffer], int], list[bytes]] = _seal_py
# open(ciphers, datagrams): each transport message's plaintext, None where it does not
# authenticate (or is too short to).
open: Callable[[Sequence[Cipher], Sequence[Buffer]], list[bytes | None]] = _open_py
_split_tcp: Callable[[bytes, int, bool], list[bytes]] = _split_tcp_py
_complete_checksum: Callable[[bytes, int, int], bytes] = offload.complete_checksum
# coalesce(packets): the writes to TUN for decrypted packets (offload.coalesce), each a list
# of buffers that starts with the virtio_net_hdr; a write whose second byte (the GSO type) is
# not 0 is a joined one.
coalesce: Callable[[Sequence[bytes]], list[list[bytes | memoryview]]] = offload.coalesce


def native_available() -> bool:
    return _native is not None


def select(native: bool) -> None:
    """Puts the native (True) or the pure-Python path in force; keypairs made before keep the
    ciphers of the path they were made under, so call it before any handshake."""
    global name, cipher, seal, open, coalesce, _split_tcp, _complete_checksum
    if native:
        if _native is None:
            raise RuntimeError(f"the native fast path is not available: {unavailable_reason}")
        name, cipher, seal, open = NATIVE_NAME, bytes, _native.seal, _native.open
        _split_tcp, coalesce = _native_split_tcp, _native_coalesce
        _complete_checksum = _native_complete_checksum
    else:
        name, cipher, seal, open = PYTHON_NAME, _cipher_py, _seal_py, _open_py
        _split_tcp, coalesce = _split_tcp_py, offload.coalesce
        _complete_checksum = offload.complete_checksum


def _native_split_tcp(packet: bytes, mss: int, v6: bool) -> list[bytes]:
    assert _native is not None
    try:
        segments: list[bytes] = _native.split_tcp(packet, mss, v6)
    except ValueError as exc:
        raise offload.OffloadError(str(exc)) from None
    return segments


def _native_coalesce(packets: Sequence[bytes]) -> list[list[bytes | memoryview]]:
    assert _native is not None
    return [[write] for write in _native.coalesce(packets)]


def _native_complete_checksum(packet: bytes, start: int, offset: int) -> bytes:
    assert _native is not None
    try:
        completed: bytes = _native.complete_checksum(packet, start, offset)
    except ValueError as exc:
        raise offload.OffloadError(str(exc)) from None
    return completed


def split(header: bytes | memoryview, packet: bytes) -> list[bytes]:
    """offload.split, TSO packets cut and partial checksums completed by the path in force."""
    if len(header) == offload.VNET_HDR_LEN:
        gso_type = header[1] & ~offload.GSO_ECN
        if gso_type == offload.GSO_NONE:
            if not header[0] & offload.F_NEEDS_CSUM:
                return [packet]
            start, offset = header[6] | header[7] << 8, header[8] | header[9] << 8
            return [_complete_checksum(packet, start, offset)]
        if gso_type in (offload.GSO_TCPV4, offload.GSO_TCPV6):
            gso_size = header[4] | header[5] << 8
            segments: list[bytes] = _split_tcp(packet, gso_size, gso_type == offload.GSO_TCPV6)
            return segments
    return offload.split(header, packet)


select(_native is not None)
