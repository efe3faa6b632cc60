"""The engine's UDP socket: where WireGuard messages arrive from and leave to the peers.

One dual-stack IPv6 socket (IPV6_V6ONLY off) serves IPv4 and IPv6 underlays; where IPv6 is
not available in the namespace, a plain IPv4 socket does. IPv4 peers reach the dual-stack
socket as IPv4-mapped IPv6 addresses, which are turned back into plain IPv4 endpoints so that
the protocol core sees the same endpoint whichever socket carried a datagram. Port 0 binds a
random port; the caller reports the chosen one to the device, as wireguard-go does. A change
of listen port or fwmark through UAPI opens a new UdpBind before the old one is closed, so a
port that is taken leaves the engine on its old one.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from podwire.agent.engine.actions import Endpoint

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# Room for a burst of datagrams while the single-threaded loop is busy elsewhere.
SOCKET_BUFFER = 4 * 1024 * 1024
# Larger than any WireGuard message for any MTU a TUN device accepts.
RECV_SIZE = 65536
_MAPPED_PREFIX = "::ffff:"
# Errors that say the IPv6 socket cannot work here, so IPv4 alone is used.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


class UdpBind:
    """The bound socket(s) for one listen port; non-blocking."""

    def __init__(self, sockets: list[socket.socket], port: int, *, dual_stack: bool) -> None:
        self.sockets = sockets
        self.port = port
        self.dual_stack = dual_stack
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)
        self.send_errors = 0

    @classmethod
    def open(cls, port: int, *, fwmark: int = 0) -> UdpBind:
        """Binds port (0 picks one); raises OSError (EADDRINUSE, ...) if it cannot."""
        try:
            sock = _bound(socket.AF_INET6, ("::", port))
            dual_stack = True
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            sock = _bound(socket.AF_INET, ("0.0.0.0", port))
            dual_stack = False
        bind = cls([sock], sock.getsockname()[1], dual_stack=dual_stack)
        try:
            bind.set_fwmark(fwmark)
        except OSError:
            bind.close()
            raise
        return bind

    def set_fwmark(self, mark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def receive_batch(self, sock: socket.socket, limit: int) -> list[tuple[bytes, Endpoint]]:
        """Up to limit datagrams waiting on sock, each with its source endpoint."""
        received: list[tuple[bytes, Endpoint]] = []
        view = self._view
        recv_into = sock.recvfrom_into
        errors = 0
        while len(received) < limit:
            try:
                size, address = recv_into(self._buffer)
            except BlockingIOError:
                break
            except OSError:
                # ICMP errors queued on the socket (ECONNREFUSED, ...) surface here, one each;
                # they say nothing about the next datagram.
                errors += 1
                if errors > limit:
                    break
                continue
            host: str = address[0]
            if host.startswith(_MAPPED_PREFIX) and "." in host:
                host = host[len(_MAPPED_PREFIX) :]
            received.append((bytes(view[:size]), (host, address[1])))
        return received

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        """Sends one datagram; one that cannot be sent now is dropped, as UDP may."""
        host, port = endpoint
        if self.dual_stack and ":" not in host:
            host = _MAPPED_PREFIX + host
        try:
            self.sockets[0].sendto(data, (host, port))
        except OSError:
            self.send_errors += 1

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []


def _bound(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _grow_buffers(sock)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _grow_buffers(sock: socket.socket) -> None:
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
