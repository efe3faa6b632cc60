"""The two fast paths against each other and against the references: the C extension and the
pure-Python path seal to the same bytes (and to what the protocol prescribes, built here from
the cryptography package), open the same datagrams and refuse the same tampered ones, and cut
TSO packets into the same segments, refusing the same garbage. Any input, however broken,
raises at most the documented error and never crashes the interpreter."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podwire.agent.engine import fastpath, offload

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclasses.dataclass
class Path:
    name: str
    cipher: Callable[[bytes], Any]
    seal: Callable[..., list[bytes]]
    open: Callable[..., list[bytes | None]]
    split: Callable[[bytes, bytes], list[bytes]]
    coalesce: Callable[[list[bytes]], list[list[bytes | memoryview]]]


def _path(native: bool) -> Path:
    before = fastpath.name == fastpath.NATIVE_NAME
    fastpath.select(native)
    try:

        def split(header: bytes, packet: bytes) -> list[bytes]:
            # fastpath.split cuts with the path in force when called: put this one in force.
            was = fastpath.name == fastpath.NATIVE_NAME
            fastpath.select(native)
            try:
                return fastpath.split(header, packet)
            finally:
                fastpath.select(was)

        return Path(
            fastpath.name, fastpath.cipher, fastpath.seal, fastpath.open, split, fastpath.coalesce
        )
    finally:
        fastpath.select(before)


@pytest.fixture(scope="module")
def paths() -> tuple[Path, Path]:
    assert fastpath.native_available(), fastpath.unavailable_reason
    return _path(True), _path(False)


def reference_seal(key: bytes, receiver: int, counter: int, packet: bytes, mtu: int) -> bytes:
    """The transport message as the paper and wireguard-go build it."""
    pad = -len(packet) % 16
    if len(packet) + pad > mtu:
        pad = max(0, mtu - len(packet))
    nonce = bytes(4) + counter.to_bytes(8, "little")
    body = ChaCha20Poly1305(key).encrypt(nonce, packet + bytes(pad), None)
    return struct.pack("<IIQ", 4, receiver, counter) + body


keys = st.binary(min_size=32, max_size=32)
packets = st.lists(st.binary(max_size=1500), max_size=12)


@SETTINGS
@given(
    key=keys,
    receiver=st.integers(0, 2**32 - 1),
    counter=st.integers(0, 2**60),
    batch=packets,
    mtu=st.integers(0, 1500),
)
def test_seal_is_the_same_on_both_paths_and_as_the_protocol_says(
    paths: tuple[Path, Path], key: bytes, receiver: int, counter: int, batch: list[bytes], mtu: int
) -> None:
    native, pure = paths
    expected = [reference_seal(key, receiver, counter + i, p, mtu) for i, p in enumerate(batch)]
    assert native.seal(native.cipher(key), receiver, counter, batch, mtu) == expected
    assert pure.seal(pure.cipher(key), receiver, counter, batch, mtu) == expected


def test_seal_takes_any_bytes_like_packet(paths: tuple[Path, Path]) -> None:
    key = bytes(range(32))
    batch: list[Any] = [bytearray(b"a" * 20), memoryview(b"b" * 33), b""]
    native, pure = paths
    expected = [reference_seal(key, 9, 7 + i, bytes(p), 1420) for i, p in enumerate(batch)]
    assert native.seal(native.cipher(key), 9, 7, batch, 1420) == expected
    assert pure.seal(pure.cipher(key), 9, 7, batch, 1420) == expected


def _tamper(data: bytes, how: int, where: int) -> bytes:
    """One of the ways a datagram arrives broken: a bit flipped in what the AEAD covers (the
    counter, as the nonce, and the ciphertext and tag; the type and receiver index are the
    caller's to check), cut short, grown."""
    if how == 0:
        i = 8 + where % (len(data) - 8)
        return data[:i] + bytes([data[i] ^ (1 << (where % 8))]) + data[i + 1 :]
    if how == 1:
        return data[: where % len(data)]
    return data + bytes([where % 256])


@SETTINGS
@given(
    two_keys=st.lists(keys, min_size=2, max_size=2, unique=True),
    batch=packets,
    owners=st.lists(st.integers(0, 1), min_size=12, max_size=12),
    broken=st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 10**6)), min_size=12, max_size=12),
)  # fmt: skip
def test_open_gives_the_plaintext_and_refuses_tampering_alike(
    paths: tuple[Path, Path],
    two_keys: list[bytes],
    batch: list[bytes],
    owners: list[int],
    broken: list[tuple[bool, int, int]],
) -> None:
    """Datagrams of two keypairs interleaved, some tampered with: both paths open the intact
    ones to their padded plaintext and give None for every other."""
    native, pure = paths
    datagrams, which, expected = [], [], []
    for i, packet in enumerate(batch):
        key = two_keys[owners[i]]
        sealed = reference_seal(key, 1, 1000 + i, packet, 1500)
        tampered, how, where = broken[i]
        if tampered:
            sealed = _tamper(sealed, how, where)
            expected.append(None)
        else:
            expected.append(packet + bytes(-len(packet) % 16))
        datagrams.append(sealed)
        which.append(key)
    for path in (native, pure):
        assert path.open([path.cipher(k) for k in which], datagrams) == expected, path.name


def test_threads_seal_and_open_at_once_each_with_its_own_keys(paths: tuple[Path, Path]) -> None:
    """The native path keeps a cipher context per thread and gives up the GIL for batches:
    threads sealing and opening at once, lone packets and batches, a forgery now and then
    (a failed open leaves its context to the next call), each get their own keys' bytes."""
    native, _ = paths
    failures: list[str] = []

    def work(n: int) -> None:
        key = bytes([n]) * 32
        cipher = native.cipher(key)
        for round_ in range(200):
            batch = [
                bytes([n, round_ % 256]) * (1 + (round_ * 7 + i) % 700)
                for i in range(round_ % 3 + 1)
            ]
            counter = round_ * 4
            sealed = native.seal(cipher, n, counter, batch, 1500)
            if sealed != [
                reference_seal(key, n, counter + i, p, 1500) for i, p in enumerate(batch)
            ]:
                failures.append(f"thread {n} sealed round {round_} wrong")
            if round_ % 5 == 0:
                forged = sealed[0][:-1] + bytes([sealed[0][-1] ^ 1])
                if native.open([cipher], [forged]) != [None]:
                    failures.append(f"thread {n} opened a forgery in round {round_}")
            opened = native.open([cipher] * len(sealed), sealed)
            if opened != [p + bytes(-len(p) % 16) for p in batch]:
                failures.append(f"thread {n} opened round {round_} wrong")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@SETTINGS
@given(garbage=st.lists(st.binary(max_size=80), max_size=8), key=keys)
def test_open_garbage_gives_none_on_both_paths(
    paths: tuple[Path, Path], garbage: list[bytes], key: bytes
) -> None:
    for path in paths:
        assert path.open([path.cipher(key)] * len(garbage), garbage) == [None] * len(garbage)


def test_wrong_arguments_are_errors_not_crashes(paths: tuple[Path, Path]) -> None:
    native = paths[0]
    for path in paths:
        with pytest.raises(ValueError):
            path.open([path.cipher(bytes(32))], [])
    with pytest.raises(ValueError):
        native.seal(b"short key", 1, 0, [b"x"], 1420)
    with pytest.raises(ValueError):
        native.open([b"short key"], [bytes(48)])
    with pytest.raises(TypeError):
        native.seal(native.cipher(bytes(32)), 1, 0, [None], 1420)
    with pytest.raises(TypeError):
        native.open([native.cipher(bytes(32))], [None])
    with pytest.raises(OverflowError):
        native.seal(native.cipher(bytes(32)), 2**32, 0, [b""], 1420)


# Cutting TSO packets.


def _tso(
    v6: bool, payload: bytes, *, seq: int, flags: int, options: bytes, ip_options: bytes, ident: int
) -> bytes:
    thl = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (thl // 4) << 4, flags, 500, 0, 0)
    tcp += options
    if v6:
        return (
            struct.pack("!IHBB", 0x6000_0000, len(tcp) + len(payload), 6, 64)
            + ipaddress.IPv6Address("fd00::1").packed
            + ipaddress.IPv6Address("fd00::2").packed
            + tcp
            + payload
        )
    ihl = 20 + len(ip_options)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(tcp) + len(payload), ident, 0x4000, 64, 6,
        0, bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]),
    )  # fmt: skip
    return ip + ip_options + tcp + payload


@SETTINGS
@given(
    v6=st.booleans(),
    size=st.integers(0, 9000),
    mss=st.integers(1, 3000),
    seq=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    options=st.integers(0, 10).map(lambda n: bytes(range(4 * n))),
    ip_options=st.integers(0, 10).map(lambda n: bytes([1]) * (4 * n)),
    ident=st.integers(0, 0xFFFF),
    ecn=st.booleans(),
    seed=st.binary(min_size=1, max_size=64),
)
def test_split_is_the_same_on_both_paths(
    paths: tuple[Path, Path],
    v6: bool,
    size: int,
    mss: int,
    seq: int,
    flags: int,
    options: bytes,
    ip_options: bytes,
    ident: int,
    ecn: bool,
    seed: bytes,
) -> None:
    payload = (seed * (size // len(seed) + 1))[:size]
    packet = _tso(v6, payload, seq=seq, flags=flags, options=options, ip_options=ip_options, ident=ident)  # fmt: skip
    gso = (offload.GSO_TCPV6 if v6 else offload.GSO_TCPV4) | (offload.GSO_ECN if ecn else 0)
    header = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, gso, 0, mss, 0, 0)
    native, pure = paths
    expected = pure.split(header, packet)
    assert native.split(header, packet) == expected
    head_len = len(packet) - size
    assert b"".join(s[head_len:] for s in expected) == payload


def _outcome(split: Callable[[bytes, bytes], list[bytes]], header: bytes, packet: bytes) -> object:
    try:
        return split(header, packet)
    except offload.OffloadError:
        return "refused"


@SETTINGS
@given(
    gso=st.sampled_from([offload.GSO_TCPV4, offload.GSO_TCPV6, offload.GSO_TCPV4 | offload.GSO_ECN]),
    mss=st.integers(0, 0xFFFF),
    packet=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: bytes([0x45]) + b),
        st.binary(max_size=120).map(lambda b: bytes([0x60]) + b),
        st.binary(min_size=60, max_size=200).map(
            lambda b: bytes([0x45]) + b[1:9] + bytes([6]) + b[10:]
        ),
        st.binary(min_size=80, max_size=200).map(lambda b: bytes([0x60]) + b[1:6] + bytes([6]) + b[7:]),
    ),
)  # fmt: skip
def test_split_refuses_the_same_garbage_on_both_paths(
    paths: tuple[Path, Path], gso: int, mss: int, packet: bytes
) -> None:
    header = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, gso, 0, mss, 0, 0)
    native, pure = paths
    assert _outcome(native.split, header, packet) == _outcome(pure.split, header, packet)


@SETTINGS
@given(
    packet=st.binary(max_size=300),
    start=st.integers(0, 320),
    offset=st.integers(0, 40),
    flags=st.sampled_from([0, offload.F_NEEDS_CSUM, offload.F_NEEDS_CSUM | offload.F_DATA_VALID]),
)
def test_a_partial_checksum_is_completed_alike_on_both_paths(
    paths: tuple[Path, Path], packet: bytes, start: int, offset: int, flags: int
) -> None:
    """A packet TUN hands over alone with its checksum left partial (an ACK, say): both paths
    complete it to the same bytes, one that verifies, or refuse the same offsets."""
    header = offload.VNET_HDR.pack(flags, offload.GSO_NONE, 0, 0, start, offset)
    native, pure = paths
    got = _outcome(native.split, header, packet)
    assert got == _outcome(pure.split, header, packet)
    if flags & offload.F_NEEDS_CSUM and got != "refused" and offset % 2 == 0:
        assert isinstance(got, list)
        # The field held the pseudo-header's sum (as the kernel leaves it): with that sum
        # added back, the completed segment verifies (a field at an even offset, as TCP's
        # and UDP's are).
        field = start + offset
        completed = got[0][start:]
        assert _verifies(completed + bytes(len(completed) % 2) + packet[field : field + 2])


def _verifies(data: bytes) -> bool:
    """The ones' complement sum over data, checksum field included, is all ones (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_split_through_the_api_uses_the_path_in_force(paths: tuple[Path, Path]) -> None:
    """fastpath.split cuts with whichever path select() put in force, and both match."""
    packet = _tso(False, bytes(range(256)) * 20, seq=5, flags=0x18, options=b"", ip_options=b"", ident=1)  # fmt: skip
    header = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 52, 1368, 20, 16)
    results = []
    for native in (True, False):
        before = fastpath.name == fastpath.NATIVE_NAME
        fastpath.select(native)
        try:
            results.append(fastpath.split(header, packet))
        finally:
            fastpath.select(before)
    assert results[0] == results[1] == offload.split(header, packet)
    assert len(results[0]) == 4


def test_select_names_the_path_in_force() -> None:
    before = fastpath.name == fastpath.NATIVE_NAME
    try:
        fastpath.select(False)
        assert fastpath.name == fastpath.PYTHON_NAME
        fastpath.select(True)
        assert fastpath.name == fastpath.NATIVE_NAME
    finally:
        fastpath.select(before)


# Joining decrypted segments.


def _flat(writes: list[list[bytes | memoryview]]) -> list[bytes]:
    return [b"".join(bytes(b) for b in write) for write in writes]


@st.composite
def segment_trains(draw: st.DrawFn) -> list[bytes]:
    """Segments as a peer's batch brings them: a few flows (IPv4 and IPv6) cut from TSO
    packets, interleaved, some lost, duplicated or reordered, some with a different header,
    PSH or FIN, plus packets that are not TCP at all."""
    trains = []
    for _ in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        size = draw(st.integers(0, 6000))
        flags = draw(st.sampled_from([0x10, 0x18, 0x11, 0x12, 0x10 | 0x80]))
        packet = _tso(
            v6, (bytes(range(256)) * (size // 256 + 1))[:size],
            seq=draw(st.integers(0, 2**32 - 1)), flags=flags,
            options=bytes(draw(st.sampled_from([0, 12]))), ip_options=b"",
            ident=draw(st.integers(0, 0xFFFF)),
        )  # fmt: skip
        trains.append(offload.split_tcp(packet, draw(st.integers(500, 1400)), v6=v6))
    segments: list[bytes] = []
    while any(trains):
        train = draw(st.sampled_from([t for t in trains if t]))
        segment = train.pop(0)
        fate = draw(st.integers(0, 12))
        if fate == 0:
            continue  # lost
        if fate == 1:
            segments.append(segment)  # duplicated
        if fate == 2:
            segment = segment[:8] + bytes([segment[8] ^ 1]) + segment[9:]  # another TTL/hop
        segments.append(segment)
    extra = draw(st.lists(st.binary(max_size=80), max_size=3))
    for junk in extra:
        segments.insert(draw(st.integers(0, len(segments))), junk)
    if draw(st.booleans()) and len(segments) > 1:
        i = draw(st.integers(0, len(segments) - 2))
        segments[i], segments[i + 1] = segments[i + 1], segments[i]
    return segments


@SETTINGS
@given(segments=segment_trains())
def test_coalesce_writes_the_same_bytes_on_both_paths(
    paths: tuple[Path, Path], segments: list[bytes]
) -> None:
    native, pure = paths
    expected = _flat(pure.coalesce(segments))
    got = _flat(native.coalesce(segments))
    assert got == expected
    assert len(got) <= len(segments)


@SETTINGS
@given(junk=st.lists(st.binary(max_size=120), max_size=10))
def test_coalesce_garbage_is_written_alone_on_both_paths(
    paths: tuple[Path, Path], junk: list[bytes]
) -> None:
    native, pure = paths
    assert _flat(native.coalesce(junk)) == _flat(pure.coalesce(junk))


def test_coalesce_joins_a_flow_on_both_paths(paths: tuple[Path, Path]) -> None:
    """Segments of one flow in order become one GSO write (the property above is not all
    singles), the same on both paths."""
    packet = _tso(False, bytes(range(256)) * 16, seq=9, flags=0x18, options=b"", ip_options=b"", ident=3)  # fmt: skip
    segments = offload.split_tcp(packet, 1000, v6=False)
    for path in paths:
        writes = _flat(path.coalesce(segments))
        assert len(writes) == 1 and writes[0][1] == offload.GSO_TCPV4, path.name
    assert _flat(paths[0].coalesce(segments)) == _flat(paths[1].coalesce(segments))


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, fastpath.NATIVE_NAME), ("off", fastpath.PYTHON_NAME), ("OFF", fastpath.PYTHON_NAME),
     ("on", fastpath.NATIVE_NAME)],
)  # fmt: skip
def test_the_environment_picks_the_path_at_start(setting: str | None, expected: str) -> None:
    """A fresh interpreter, as an engine starts: native where the extension is built, pure
    Python when PODWIRE_ENGINE_NATIVE=off; and an engine's keypairs seal on the path named."""
    env = {k: v for k, v in os.environ.items() if k != fastpath.ENV}
    if setting is not None:
        env[fastpath.ENV] = setting
    script = (
        "from podwire.agent.engine import fastpath, noise\n"
        "k = noise.Keypair(sending_key=bytes(32), receiving_key=bytes(32),"
        " i_am_the_initiator=True, local_index=1, remote_index=2, created=0.0)\n"
        "print(fastpath.name, type(k.sending).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [expected, "bytes" if expected == fastpath.NATIVE_NAME else "ChaCha20Poly1305"]
