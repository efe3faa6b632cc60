"""Tun.read_batch with offloads, fed through a pipe in place of /dev/net/tun (no root): what
the kernel hands over behind a virtio_net_hdr comes out as MTU-size packets, and a header or
packet that makes no sense is dropped and counted, never raised."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from podwire.agent.engine import offload
from podwire.agent.engine import tun as tun_mod


@pytest.fixture
def piped() -> Iterator[tuple[tun_mod.Tun, int]]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    tun = tun_mod.Tun("pipe0", read_end, vnet_hdr=True)
    yield tun, write_end
    tun.close()
    os.close(write_end)


def _tso_packet(payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 500, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 7, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    return ip + tcp + payload


def _read(tun: tun_mod.Tun, write_end: int, data: bytes) -> list[bytes]:
    os.write(write_end, data)
    return tun.read_batch(8)


def test_a_tso_read_comes_out_as_segments(piped: tuple[tun_mod.Tun, int]) -> None:
    tun, write_end = piped
    header = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, 1000, 20, 16)
    packets = _read(tun, write_end, header + _tso_packet(b"x" * 2500))
    assert [len(p) for p in packets] == [1040, 1040, 540]
    assert tun.bad_offload == 0


def test_a_plain_read_passes_as_it_is(piped: tuple[tun_mod.Tun, int]) -> None:
    tun, write_end = piped
    packet = _tso_packet(b"y" * 100)
    assert _read(tun, write_end, bytes(10) + packet) == [packet]


@pytest.mark.parametrize(
    "header",
    [
        offload.VNET_HDR.pack(0, 99, 0, 0, 0, 0),  # no such GSO type
        offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, 0, 20, 16),  # size 0
        offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, 0, 0, 0, 5000, 16),  # beyond the packet
        offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV6, 60, 1000, 40, 16),
        offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_UDP_L4, 28, 1000, 20, 6),
    ],
)
def test_nonsense_is_dropped_and_counted(piped: tuple[tun_mod.Tun, int], header: bytes) -> None:
    tun, write_end = piped
    assert _read(tun, write_end, header + _tso_packet(b"z" * 3000)) == []
    assert tun.bad_offload == 1
    # The next read is served as usual.
    assert len(_read(tun, write_end, bytes(10) + _tso_packet(b"ok"))) == 1


def test_a_truncated_read_is_dropped_and_counted(piped: tuple[tun_mod.Tun, int]) -> None:
    tun, write_end = piped
    header = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, 1000, 20, 16)
    assert _read(tun, write_end, header + _tso_packet(b"x" * 2500)[:30]) == []
    assert tun.bad_offload == 1
