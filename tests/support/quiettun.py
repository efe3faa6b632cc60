"""A stand-in for the engine's TUN device where only the UDP side of a test runs: it reads
nothing and keeps what is written to it. Its fd is one end of a socket pair, so the loop's
selector can watch it."""

from __future__ import annotations

import socket


class QuietTun:
    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self.fd = self._ours.fileno()
        self.read_errors = self.write_errors = self.bad_offload = self.coalesced_writes = 0
        self.vnet_hdr = self.coalescing = False
        self.offloads: tuple[str, ...] = ()
        self.written: list[bytes] = []

    def read_batch(self, limit: int) -> list[bytes]:
        return []

    def write(self, packet: bytes) -> None:
        self.written.append(packet)

    def write_batch(self, packets: list[bytes]) -> None:
        self.written += packets

    def mtu(self) -> int:
        return 1420

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()
