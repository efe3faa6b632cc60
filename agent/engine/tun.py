"""The TUN device: the engine's end of the tunnel, where the kernel hands over IP packets.

Opened like wireguard-go opens it: /dev/net/tun with IFF_TUN | IFF_NO_PI, so a read is one
IP packet (behind a virtio_net_hdr, with offloads) and a write injects one. The engine only creates the device and sets its MTU;
addresses, routes and `up` are for `ip`, wg-quick or the agent. The device is not persistent:
it goes away when the engine closes its descriptor (or exits), and when someone deletes the
link (`ip link del`, as wg-quick down does) the descriptor fails with EBADFD, which ends the
engine.

Offloads, as the newest wireguard-go opens it: with IFF_VNET_HDR every read and write carries
a virtio_net_hdr, and TUNSETOFFLOAD lets the kernel hand over up to 64 KiB of TCP (TSO) or UDP
(USO, where the kernel has it) with the checksum left partial, which `offload.split` cuts into
MTU-size packets (`fastpath.split`, native where the extension is built); decrypted TCP segments go back joined into one write (`offload.coalesce`).
Each feature is tried at creation and dropped if the kernel refuses it; `offloads` says what
is in force. A header that makes no sense drops its packet (counter tun_bad_offload).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

from podwire.agent.engine import fastpath, offload

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# Tried in order; the first the kernel takes is in force (USO arrived in Linux 6.2).
OFFLOAD_CHOICES = (
    (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
        ("csum", "tso4", "tso6", "uso4", "uso6"),
    ),
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, ("csum", "tso4", "tso6")),
    (TUN_F_CSUM, ("csum",)),
)
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16
# struct ifreq is the name and a 24-byte union on 64-bit Linux.
IFREQ_SIZE = 40

DEFAULT_MTU = 1420
# A read never returns more than the MTU, but the MTU may be raised while we run; with
# offloads a read is a virtio_net_hdr and up to 64 KiB.
READ_SIZE = 65536 + offload.VNET_HDR_LEN + 64
# Errors that mean the link is gone for good (deleted, or the fd detached from it).
_GONE = {errno.EBADFD, errno.ENODEV, errno.ENXIO}


class TunError(RuntimeError):
    """The TUN device could not be created or configured; the message says why."""


class TunGone(RuntimeError):
    """The TUN device was deleted under the engine (for example by `ip link del`)."""


def _ifreq(name: str, fmt: str, value: int) -> bytes:
    return struct.pack(f"{IFNAMSIZ}s{fmt}", name.encode(), value).ljust(IFREQ_SIZE, b"\0")


def valid_name(name: str) -> bool:
    """What the kernel accepts as an interface name."""
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in name for c in "/: \t\n")
    )


class Tun:
    """An open TUN device; non-blocking."""

    def __init__(self, name: str, fd: int, *, vnet_hdr: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        # What TUNSETOFFLOAD took: "csum", "tso4", "tso6", "uso4", "uso6".
        self.offloads: tuple[str, ...] = ()
        # Decrypted TCP segments joined into one write; off after the kernel refuses one.
        self.coalescing = vnet_hdr
        self.read_errors = 0
        self.write_errors = 0
        self.bad_offload = 0
        self.coalesced_writes = 0

    @classmethod
    def create(cls, name: str, *, mtu: int = DEFAULT_MTU, offloads: bool = True) -> Tun:
        """Creates the device name; fails if a device of that name exists and is not free.
        With offloads, IFF_VNET_HDR and as much of TUNSETOFFLOAD as the kernel takes."""
        if not valid_name(name):
            raise TunError(f"{name!r} is not a valid interface name (1 to 15 characters)")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
        flags = IFF_TUN | IFF_NO_PI
        vnet_hdr = False
        if offloads:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", flags | IFF_VNET_HDR))
                vnet_hdr = True
            except OSError:
                pass  # an old kernel, or a sandbox that refuses it: plain packets then
        if not vnet_hdr:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", flags))
            except OSError as exc:
                os.close(fd)
                raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
        tun = cls(name, fd, vnet_hdr=vnet_hdr)
        if vnet_hdr:
            tun.offloads = _set_offloads(fd)
        try:
            tun.set_mtu(mtu)
        except TunError:
            tun.close()
            raise
        return tun

    def mtu(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, _ifreq(self.name, "i", 0))
            except OSError as exc:
                raise TunError(f"cannot read the MTU of {self.name}: {exc.strerror}") from None
        value: int = struct.unpack_from("i", answer, IFNAMSIZ)[0]
        return value

    def set_mtu(self, mtu: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                fcntl.ioctl(sock.fileno(), SIOCSIFMTU, _ifreq(self.name, "i", mtu))
            except OSError as exc:
                raise TunError(f"cannot set the MTU of {self.name}: {exc.strerror}") from None

    def read_batch(self, limit: int) -> list[bytes]:
        """The IP packets of up to limit reads, as many as are waiting, large ones cut to the
        MTU; raises TunGone if the link is gone."""
        if not self.vnet_hdr:
            return self._read_plain(limit)
        packets: list[bytes] = []
        read = os.read
        fd = self.fd
        split = fastpath.split
        single = offload.SINGLE_HEADER
        hdr_len = offload.VNET_HDR_LEN
        for _ in range(limit):
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _GONE:
                    raise TunGone(f"TUN device {self.name} is gone") from None
                self.read_errors += 1
                break
            header = data[:hdr_len]
            if header[:2] == b"\0\0" or header == single:
                packets.append(data[hdr_len:])
                continue
            try:
                packets += split(header, data[hdr_len:])
            except Exception:  # OffloadError, or a bug: the packet goes, the engine stays
                self.bad_offload += 1
        return packets

    def _read_plain(self, limit: int) -> list[bytes]:
        packets: list[bytes] = []
        read = os.read
        fd = self.fd
        while len(packets) < limit:
            try:
                packets.append(read(fd, READ_SIZE))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _GONE:
                    raise TunGone(f"TUN device {self.name} is gone") from None
                self.read_errors += 1
                break
        return packets

    def write(self, packet: bytes) -> None:
        """Hands one IP packet to the kernel; a packet the kernel refuses is dropped."""
        if self.vnet_hdr:
            self._write([offload.SINGLE_HEADER, packet])
        else:
            self._write([packet])

    def write_batch(self, packets: list[bytes]) -> None:
        """Hands packets to the kernel, TCP segments of one flow joined where possible."""
        if not self.vnet_hdr:
            for packet in packets:
                self._write([packet])
            return
        if not self.coalescing or len(packets) == 1:
            for packet in packets:
                self._write([offload.SINGLE_HEADER, packet])
            return
        try:
            writes = fastpath.coalesce(packets)
        except Exception:  # a bug, never a peer's packet: write them as they came
            self.bad_offload += 1
            writes = [[offload.SINGLE_HEADER, packet] for packet in packets]
        for buffers in writes:
            # The GSO type, the virtio_net_hdr's second byte: 0 for a packet written alone.
            if not buffers[0][1]:
                self._write(buffers)
                continue
            self.coalesced_writes += 1
            if self._write(buffers) == errno.EINVAL:
                # The kernel refuses GSO packets: write singly from now on.
                self.coalescing = False

    def _write(self, buffers: list[bytes | memoryview]) -> int:
        """0, or the errno of a write the kernel refused (the packet is dropped)."""
        try:
            os.writev(self.fd, buffers)
        except OSError as exc:
            if exc.errno in _GONE:
                raise TunGone(f"TUN device {self.name} is gone") from None
            self.write_errors += 1
            return exc.errno or errno.EIO
        return 0

    def close(self) -> None:
        """Closes the descriptor, which removes the (non-persistent) device."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _set_offloads(fd: int) -> tuple[str, ...]:
    """The richest TUNSETOFFLOAD the kernel takes, by name; () if it takes none."""
    for flags, names in OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return names
    return ()
