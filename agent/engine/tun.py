"""The TUN device: the engine's end of the tunnel, where the kernel hands over IP packets.

Opened like wireguard-go opens it: /dev/net/tun with IFF_TUN | IFF_NO_PI, so a read is exactly
one IP packet and a write injects one. The engine only creates the device and sets its MTU;
addresses, routes and `up` are for `ip`, wg-quick or the agent. The device is not persistent:
it goes away when the engine closes its descriptor (or exits), and when someone deletes the
link (`ip link del`, as wg-quick down does) the descriptor fails with EBADFD, which ends the
engine.

IFF_VNET_HDR offloads (large segments in, coalesced segments out) are left for the performance
work; reads are already shaped as batches.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16
# struct ifreq is the name and a 24-byte union on 64-bit Linux.
IFREQ_SIZE = 40

DEFAULT_MTU = 1420
# A read never returns more than the MTU, but the MTU may be raised while we run.
READ_SIZE = 65536
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

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.read_errors = 0
        self.write_errors = 0

    @classmethod
    def create(cls, name: str, *, mtu: int = DEFAULT_MTU) -> Tun:
        """Creates the device name; fails if a device of that name exists and is not free."""
        if not valid_name(name):
            raise TunError(f"{name!r} is not a valid interface name (1 to 15 characters)")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
        tun = cls(name, fd)
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
        """Up to limit packets, as many as are waiting; raises TunGone if the link is gone."""
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
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno in _GONE:
                raise TunGone(f"TUN device {self.name} is gone") from None
            self.write_errors += 1

    def close(self) -> None:
        """Closes the descriptor, which removes the (non-persistent) device."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
