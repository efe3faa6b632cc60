"""Segmentation and coalescing offloads: the header arithmetic between TUN's large packets and
WireGuard's MTU-size ones.

With IFF_VNET_HDR the kernel hands the engine one virtio_net_hdr and up to 64 KiB of TCP (or,
with USO, UDP) at a time, its checksum left partial; the engine cuts it into MTU-size packets
with headers of their own, each then sealed as one WireGuard message (`split`). The other way,
decrypted TCP segments of one flow that follow each other are joined back into one large
packet that the kernel takes in one write (`coalesce`), as wireguard-go does, and every packet
written says that its checksum needs no check: WireGuard has authenticated it.

Pure: bytes in, bytes out, no I/O. Anything malformed raises OffloadError, which the I/O loop
counts and drops; nothing here lets a packet past unsealed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h), little-endian as TUN uses it here.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

PROTO_TCP = 6
PROTO_UDP = 17
# TCP flags (byte 13 of its header).
FIN = 0x01
PSH = 0x08
ACK = 0x10
CWR = 0x80
# The largest IP packet a length field can state (IPv4 total length, IPv6 payload length).
MAX_LENGTH = 65535

_U16 = struct.Struct("!H")
_2U16 = struct.Struct("!HH")
_U32 = struct.Struct("!I")

# A packet written to TUN as it is: its checksum was authenticated with it.
SINGLE_HEADER = VNET_HDR.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)


class OffloadError(ValueError):
    """A virtio_net_hdr or the packet behind it makes no sense; the packet is dropped."""


def checksum_sum(data: Buffer, initial: int = 0) -> int:
    """The ones' complement sum of data as 16-bit big-endian words, folded to 16 bits.

    A number written in base 2**16 is congruent modulo 0xffff to the sum of its digits, so one
    conversion to an integer replaces a loop over words. 0xffff (not 0) is the sum of data that
    is not all zero, as the word-by-word sum gives.
    """
    n = len(data)
    value = int.from_bytes(data, "big")
    if n & 1:
        value <<= 8
    total = value % 0xFFFF + initial % 0xFFFF
    total %= 0xFFFF
    if total == 0 and (value or initial):
        return 0xFFFF
    return total


def finish(total: int) -> int:
    """The checksum field for a folded sum: its complement (a zero result is sent as 0xffff)."""
    return (~total & 0xFFFF) or 0xFFFF


def pseudo_header_sum(packet: Buffer, proto: int, length: int) -> int:
    """The folded sum of the IPv4 or IPv6 pseudo-header for a transport segment of length."""
    addresses = packet[12:20] if packet[0] >> 4 == 4 else packet[8:40]
    return checksum_sum(addresses, proto + length)


def ipv4_header_checksum(header: bytearray) -> None:
    """Sets the IPv4 header's checksum field (bytes 10-11) over the header as it stands (what
    follows the IPv4 header, if anything, is not summed)."""
    header[10:12] = b"\0\0"
    ihl = (header[0] & 0x0F) * 4
    header[10:12] = finish(checksum_sum(memoryview(header)[:ihl])).to_bytes(2, "big")


def _ip_header(packet: bytes) -> tuple[int, int, int]:
    """(IP version, IP header length, transport protocol) of a packet that has no extension
    headers; raises OffloadError otherwise."""
    if not packet:
        raise OffloadError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            raise OffloadError("bad IPv4 header length")
        return 4, ihl, packet[9]
    if version == 6:
        if len(packet) < 40:
            raise OffloadError("short IPv6 header")
        return 6, 40, packet[6]
    raise OffloadError(f"IP version {version}")


def split(header: bytes | memoryview, packet: bytes) -> list[bytes]:
    """The IP packets a TUN read (virtio_net_hdr, then packet) stands for, each complete."""
    if len(header) != VNET_HDR_LEN:
        raise OffloadError("short virtio_net_hdr")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            return [complete_checksum(packet, csum_start, csum_offset)]
        return [packet]
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return split_tcp(packet, gso_size, v6=gso_type == GSO_TCPV6)
    if gso_type == GSO_UDP_L4:
        return split_udp(packet, gso_size)
    raise OffloadError(f"GSO type {gso_type}")


def complete_checksum(packet: bytes, start: int, offset: int) -> bytes:
    """The packet with the partial checksum at start+offset completed over packet[start:]."""
    field = start + offset
    if field + 2 > len(packet) or start >= len(packet):
        raise OffloadError("checksum offsets beyond the packet")
    out = bytearray(packet)
    out[field : field + 2] = finish(checksum_sum(memoryview(packet)[start:])).to_bytes(2, "big")
    return bytes(out)


def _check_version(version: int, *, v6: bool) -> None:
    if version != (6 if v6 else 4):
        raise OffloadError("GSO type does not match the IP version")


def split_tcp(packet: bytes, mss: int, *, v6: bool) -> list[bytes]:
    """A TSO packet cut into segments of mss payload bytes: lengths, IPv4 IDs, sequence
    numbers and checksums of their own; FIN and PSH on the last only, CWR on the first only."""
    version, ihl, proto = _ip_header(packet)
    _check_version(version, v6=v6)
    if proto != PROTO_TCP or len(packet) < ihl + 20:
        raise OffloadError("TSO packet is not TCP")
    thl = (packet[ihl + 12] >> 4) * 4
    head_len = ihl + thl
    if thl < 20 or len(packet) < head_len:
        raise OffloadError("bad TCP header length")
    if mss <= 0:
        raise OffloadError("zero GSO size")
    payload = memoryview(packet)[head_len:]
    starts = range(0, max(1, len(payload)), mss)
    last = len(starts) - 1
    ip = bytearray(packet[:ihl])
    tcp = bytearray(packet[ihl:head_len])
    tcp[16:18] = b"\0\0"
    v4 = version == 4
    # What every segment's sums share: the IPv4 header without its length, ID and checksum;
    # the pseudo-header without its length (the addresses, the protocol).
    ident = 0
    if v4:
        ident = int.from_bytes(ip[4:6], "big")
        ip[2:6] = bytes(4)
        ip[10:12] = bytes(2)
        ip_base = int.from_bytes(ip, "big") % 0xFFFF
        pseudo_base = int.from_bytes(packet[12:20], "big") % 0xFFFF + PROTO_TCP
    else:
        ip_base = 0
        pseudo_base = int.from_bytes(packet[8:40], "big") % 0xFFFF + PROTO_TCP
    seq = int.from_bytes(tcp[4:8], "big")
    flags = tcp[13]
    # The TCP header's sum without the words that change: sequence number and flags.
    tcp[4:8] = bytes(4)
    tcp[13] = 0
    tcp_base = int.from_bytes(tcp, "big") % 0xFFFF + pseudo_base + thl
    join = b"".join
    pack_u32, pack_u16, pack_2u16 = _U32.pack_into, _U16.pack_into, _2U16.pack_into
    segments = []
    for index, start in enumerate(starts):
        chunk = payload[start : start + mss]
        size = len(chunk)
        this_seq = (seq + start) & 0xFFFFFFFF
        this_flags = flags if index == last else flags & ~(FIN | PSH)
        if index:
            this_flags &= ~CWR
        # A chunk of odd length is summed as if padded with a zero byte: times 256.
        words = int.from_bytes(chunk, "big") % 0xFFFF
        if size & 1:
            words <<= 8
        total = words + tcp_base + (this_seq >> 16) + (this_seq & 0xFFFF) + this_flags + size
        total %= 0xFFFF
        pack_u32(tcp, 4, this_seq)
        tcp[13] = this_flags
        pack_u16(tcp, 16, 0xFFFF - total if total else 0xFFFF)
        if v4:
            length = head_len + size
            this_id = (ident + index) & 0xFFFF
            header_sum = (ip_base + length + this_id) % 0xFFFF
            pack_2u16(ip, 2, length, this_id)
            pack_u16(ip, 10, 0xFFFF - header_sum if header_sum else 0xFFFF)
        else:
            pack_u16(ip, 4, thl + size)
        segments.append(join((ip, tcp, chunk)))
    return segments


def _set_ip_length(head: bytearray, ihl: int, total: int, index: int) -> None:
    """IPv4: total length, ID advanced by index, header checksum; IPv6: payload length."""
    if head[0] >> 4 == 4:
        head[2:4] = total.to_bytes(2, "big")
        ident = (int.from_bytes(head[4:6], "big") + index) & 0xFFFF
        head[4:6] = ident.to_bytes(2, "big")
        ipv4_header_checksum(head)
    else:
        head[4:6] = (total - 40).to_bytes(2, "big")


def _set_transport_checksum(
    head: bytearray, ihl: int, field: int, proto: int, payload: memoryview
) -> None:
    head[field : field + 2] = b"\0\0"
    length = len(head) - ihl + len(payload)
    total = checksum_sum(payload, checksum_sum(memoryview(head)[ihl:], 0))
    total = checksum_sum(b"", total + pseudo_header_sum(head, proto, length))
    head[field : field + 2] = finish(total).to_bytes(2, "big")


def split_udp(packet: bytes, size: int) -> list[bytes]:
    """A USO packet cut into datagrams of size payload bytes, each with its own UDP header."""
    _, ihl, proto = _ip_header(packet)
    if proto != PROTO_UDP or len(packet) < ihl + 8:
        raise OffloadError("USO packet is not UDP")
    if size <= 0:
        raise OffloadError("zero GSO size")
    head_len = ihl + 8
    payload = memoryview(packet)[head_len:]
    datagrams = []
    for index, start in enumerate(range(0, max(1, len(payload)), size)):
        chunk = payload[start : start + size]
        head = bytearray(packet[:head_len])
        _set_ip_length(head, ihl, head_len + len(chunk), index)
        head[ihl + 4 : ihl + 6] = (8 + len(chunk)).to_bytes(2, "big")
        _set_transport_checksum(head, ihl, ihl + 6, PROTO_UDP, chunk)
        datagrams.append(bytes(head) + chunk)
    return datagrams


# The other way: decrypted segments joined for one write.


class _Run:
    """Segments of one TCP flow that follow each other, to be written as one."""

    __slots__ = (
        "fixed", "head", "ihl", "length", "next_id", "next_seq", "open", "parts", "size", "v4",
    )  # fmt: skip

    def __init__(self, packet: bytes, ihl: int, head_len: int) -> None:
        self.head = packet[:head_len]
        self.parts: list[bytes | memoryview] = [packet]
        self.ihl = ihl
        self.v4 = ihl == 20
        self.size = len(packet) - head_len
        self.next_seq = (int.from_bytes(packet[ihl + 4 : ihl + 8], "big") + self.size) & 0xFFFFFFFF
        self.next_id = (int.from_bytes(packet[4:6], "big") + 1) & 0xFFFF
        self.length = len(packet)
        self.open = not packet[ihl + 13] & PSH
        self.fixed = _fixed(packet, ihl, head_len)

    def take(self, packet: bytes, ihl: int, head_len: int) -> bool:
        """Appends packet if it continues the run; False if it does not."""
        size = len(packet) - head_len
        if (
            not self.open
            or ihl != self.ihl
            or size > self.size
            or self.length + size > MAX_LENGTH
            or int.from_bytes(packet[ihl + 4 : ihl + 8], "big") != self.next_seq
            or (self.v4 and int.from_bytes(packet[4:6], "big") != self.next_id)
            or _fixed(packet, ihl, head_len) != self.fixed
        ):
            return False
        self.parts.append(memoryview(packet)[head_len:])
        self.length += size
        self.next_seq = (self.next_seq + size) & 0xFFFFFFFF
        self.next_id = (self.next_id + 1) & 0xFFFF
        if size < self.size or packet[ihl + 13] & PSH:
            self.open = False
            if packet[ihl + 13] & PSH:
                head = bytearray(self.head)
                head[ihl + 13] |= PSH
                self.head = bytes(head)
        return True

    def buffers(self) -> list[bytes | memoryview]:
        """What to write to TUN: the virtio_net_hdr, the packet's parts."""
        if len(self.parts) == 1:
            return [SINGLE_HEADER, self.parts[0]]
        ihl = self.ihl
        head = bytearray(self.head)
        if self.v4:
            head[2:4] = self.length.to_bytes(2, "big")
            ipv4_header_checksum(head)
        else:
            head[4:6] = (self.length - 40).to_bytes(2, "big")
        # NEEDS_CSUM: the field holds the pseudo-header's sum, the kernel adds the rest.
        pseudo = pseudo_header_sum(head, PROTO_TCP, self.length - ihl)
        head[ihl + 16 : ihl + 18] = pseudo.to_bytes(2, "big")
        vnet = VNET_HDR.pack(
            F_NEEDS_CSUM,
            GSO_TCPV4 if self.v4 else GSO_TCPV6,
            len(head),
            self.size,
            ihl,
            16,
        )
        first = self.parts[0]
        return [vnet, bytes(head), memoryview(first)[len(head) :], *self.parts[1:]]


def _fixed(packet: bytes, ihl: int, head_len: int) -> tuple[int, int, bytes, bytes, bytes]:
    """What must be equal between the segments of a run besides their flow: IPv4 TOS and
    TTL (IPv6 traffic class, flow label, hop limit), the acknowledgement and header length,
    the window, the options."""
    if ihl == 20:
        ip = (packet[1] << 8) | packet[8]
        df = packet[6]
    else:
        ip = int.from_bytes(packet[0:4], "big")
        df = packet[7]
    return (
        ip,
        df,
        packet[ihl + 8 : ihl + 13],
        packet[ihl + 14 : ihl + 16],
        packet[ihl + 20 : head_len],
    )


def _tcp_flow(packet: bytes) -> tuple[bytes, int, int] | None:
    """A coalescable TCP segment's flow (addresses and ports) with its IP and whole header
    lengths; None for anything else."""
    n = len(packet)
    if n < 40:
        return None
    version = packet[0] >> 4
    if version == 4:
        # No IP options, not a fragment, TCP.
        if packet[0] != 0x45 or packet[9] != PROTO_TCP or packet[6] & 0x3F or packet[7]:
            return None
        ihl = 20
        flow = packet[12:24]
    elif version == 6:
        if n < 60 or packet[6] != PROTO_TCP:
            return None
        ihl = 40
        flow = packet[8:44]
    else:
        return None
    thl = (packet[ihl + 12] >> 4) * 4
    head_len = ihl + thl
    # Only plain data segments: ACK, perhaps PSH; a payload to carry.
    if thl < 20 or n <= head_len or packet[ihl + 13] & ~PSH != ACK:
        return None
    return flow, ihl, head_len


def coalesce(packets: Iterable[bytes]) -> list[list[bytes | memoryview]]:
    """The writes to TUN for packets: consecutive segments of a TCP flow joined into one GSO
    packet, anything else alone. Each write is a list of buffers, the virtio_net_hdr first."""
    runs: list[_Run | bytes] = []
    open_runs: dict[bytes, _Run] = {}
    for packet in packets:
        found = _tcp_flow(packet)
        if found is None:
            runs.append(packet)
            continue
        flow, ihl, head_len = found
        run = open_runs.get(flow)
        if run is not None and run.take(packet, ihl, head_len):
            continue
        run = open_runs[flow] = _Run(packet, ihl, head_len)
        runs.append(run)
    return [[SINGLE_HEADER, r] if isinstance(r, bytes) else r.buffers() for r in runs]
