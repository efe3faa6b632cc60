"""The engine's UDP socket: where WireGuard messages arrive from and leave to the peers.

One dual-stack IPv6 socket (IPV6_V6ONLY off) serves IPv4 and IPv6 underlays; where IPv6 is
not available in the namespace, a plain IPv4 socket does. IPv4 peers reach the dual-stack
socket as IPv4-mapped IPv6 addresses, which are turned back into plain IPv4 endpoints so that
the protocol core sees the same endpoint whichever socket carried a datagram. Port 0 binds a
random port; the caller reports the chosen one to the device, as wireguard-go does. A change
of listen port or fwmark through UAPI opens a new UdpBind before the old one is closed, so a
port that is taken leaves the engine on its old one.

Where the kernel takes the steering program (see steer), the port has three sockets in a
SO_REUSEPORT group, one per role: data, handshakes from peers' endpoints, and the rest, whose
small buffer the kernel lets overflow under a flood. Where it does not, one socket does all,
as before. The group is only formed on a port that nothing else holds: a port that is taken
is refused (EADDRINUSE) as with one socket, never joined.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
from typing import Any

from podwire.agent.engine import steer
from podwire.agent.engine.actions import Endpoint

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# wireguard-go's socketBufferSize: room for bursts while the loop is busy elsewhere.
SOCKET_BUFFER = 7 << 20
# The budgeted socket's: a few hundred handshake messages, so a flood overflows it in the
# kernel (for nothing) rather than in the loop; room enough for a burst when not flooded.
BUDGETED_BUFFER = 256 << 10
# A GSO send: at most this many datagrams (the kernel's UDP_MAX_SEGMENTS) and bytes.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_SEGMENT = struct.Struct("=H")
# Larger than any WireGuard message for any MTU a TUN device accepts.
RECV_SIZE = 65536
_MAPPED_PREFIX = "::ffff:"
# Socket addresses whose endpoint (and endpoints whose socket address) a bind remembers.
_ADDRESSES_KEPT = 1024
# Errors that say the IPv6 socket cannot work here, so IPv4 alone is used.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


class UdpBind:
    """The bound socket(s) for one listen port; non-blocking."""

    def __init__(
        self,
        sockets: list[socket.socket],
        port: int,
        *,
        dual_stack: bool,
        offloads: bool = True,
        steered: bool = False,
    ) -> None:
        # With steering, the group's sockets in their roles' order (steer.ROLES).
        self.sockets = sockets
        self.port = port
        self.dual_stack = dual_stack
        self.steered = steered
        self._sender = sockets[steer.DATA] if steered else sockets[0]
        # The handshakes from unknown sources, read within a budget under load; None: one socket.
        self.budgeted: socket.socket | None = sockets[steer.BUDGETED] if steered else None
        # Kept for a rebind, which opens the new port the same way.
        self.steering_wanted = steered
        # Why the kernel refused steering ("" while it steers, or was not asked to), to log.
        self.steer_off_reason = ""
        self._steered_sources: tuple[list[bytes], list[bytes]] = ([], [])
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)
        # The endpoint of each socket address datagrams came from (an IPv4 source unmapped
        # from ::ffff:), and the socket address of each endpoint sent to: one lookup a packet
        # instead of string work. Bounded: cleared when full (a flood's many sources).
        self._sources: dict[tuple[Any, ...], Endpoint] = {}
        self._destinations: dict[Endpoint, tuple[str, int]] = {}
        self.send_errors = 0
        # Kept for a rebind, which opens the new socket the same way.
        self.offloads_wanted = offloads
        self.gso = offloads and all(_try_option(sock, UDP_SEGMENT, 0) for sock in sockets)
        self.gro = offloads and all(_try_option(sock, UDP_GRO, 1) for sock in sockets)
        # Why GSO went off while running, for the loop to log once; "" while it is on.
        self.gso_off_reason = ""
        self.gso_sends = 0
        self.gro_receives = 0

    @classmethod
    def open(
        cls, port: int, *, fwmark: int = 0, offloads: bool = True, steering: bool = True
    ) -> UdpBind:
        """Binds port (0 picks one); raises OSError (EADDRINUSE, ...) if it cannot. With
        steering, a group of sockets, or one socket if the kernel refuses the program."""
        try:
            sock = _bound(socket.AF_INET6, ("::", port))
            dual_stack = True
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            sock = _bound(socket.AF_INET, ("0.0.0.0", port))
            dual_stack = False
        group, reason = _steered_group(sock, dual_stack=dual_stack) if steering else ([], "")
        if group:
            bind = cls(
                group, group[0].getsockname()[1], dual_stack=dual_stack, offloads=offloads,
                steered=True,
            )  # fmt: skip
        else:
            bind = cls([sock], sock.getsockname()[1], dual_stack=dual_stack, offloads=offloads)
        bind.steering_wanted = steering
        bind.steer_off_reason = reason
        try:
            bind.set_fwmark(fwmark)
        except OSError:
            bind.close()
            raise
        return bind

    def steer_sources(self, hosts: set[str]) -> bool:
        """Handshakes from these hosts (the peers' endpoints) take the priority socket from
        now on; True if the program changed. Call when the endpoints change. A refusal turns
        nothing off: the previous program stays, and steer_off_reason says why."""
        if not self.steered:
            return False
        sources = steer.sources(hosts)
        if sources == self._steered_sources:
            return False
        try:
            steer.attach(self.sockets[0], steer.program(*sources))
        except steer.SteerError as exc:
            self.steer_off_reason = str(exc)
            return False
        self._steered_sources = sources
        return True

    @property
    def steered_sources(self) -> int:
        """How many source addresses the program sends to the priority socket."""
        v4, v6 = steer.fitting(*self._steered_sources)
        return len(v4) + len(v6)

    def kernel_drops(self) -> int | None:
        """What the kernel dropped for the budgeted socket (its buffer full), if steered."""
        return None if self.budgeted is None else steer.kernel_drops(self.budgeted)

    def set_fwmark(self, mark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def offloads(self) -> list[str]:
        """The offloads in force: "udp_gso", "udp_gro", and "udp_steering" (not an offload,
        but a feature of the socket's that engine_started lists beside them)."""
        features = [("udp_gso", self.gso), ("udp_gro", self.gro), ("udp_steering", self.steered)]
        return [name for name, on in features if on]

    def buffer_sizes(self) -> tuple[int, int]:
        """The receive and send buffers the kernel granted (it reports them doubled)."""
        sock = self._sender
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2,
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2,
        )

    def receive_batch(self, sock: socket.socket, limit: int) -> list[tuple[bytes, Endpoint]]:
        """Up to about limit datagrams waiting on sock, each with its source endpoint."""
        if self.gro:
            return self._receive_gro(sock, limit)
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
            source = self._sources.get(address) or self._source(address)
            received.append((bytes(view[:size]), source))
        return received

    def _receive_gro(self, sock: socket.socket, limit: int) -> list[tuple[bytes, Endpoint]]:
        received: list[tuple[bytes, Endpoint]] = []
        view = self._view
        recvmsg_into = sock.recvmsg_into
        buffers = [self._buffer]
        errors = 0
        while len(received) < limit:
            try:
                size, ancillary, _flags, address = recvmsg_into(buffers, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                errors += 1
                if errors > limit:
                    break
                continue
            source = self._sources.get(address) or self._source(address)
            segment = size
            for level, kind, data in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    # The segment size, a native int (a u16 on some kernels).
                    segment = int.from_bytes(data[:4].ljust(4, b"\0"), sys.byteorder) or size
            if segment >= size:
                received.append((bytes(view[:size]), source))
                continue
            self.gro_receives += 1
            for start in range(0, size, segment):
                received.append((bytes(view[start : min(size, start + segment)]), source))
        return received

    def send_batch(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Sends datagrams in order; runs of equal size to one endpoint go out in one GSO call
        (the last of a run may be shorter)."""
        if not self.gso:
            for data, endpoint in datagrams:
                self.send(data, endpoint)
            return
        i, n = 0, len(datagrams)
        while i < n:
            data, endpoint = datagrams[i]
            size = len(data)
            j, total = i + 1, size
            while j < n and j - i < GSO_MAX_SEGMENTS and total + size <= GSO_MAX_BYTES:
                following, where = datagrams[j]
                if where != endpoint or len(following) > size:
                    break
                j += 1
                total += len(following)
                if len(following) < size:
                    break
            if j - i == 1:
                self.send(data, endpoint)
            else:
                self._send_gso([d for d, _ in datagrams[i:j]], size, endpoint)
            i = j

    def _source(self, address: tuple[Any, ...]) -> Endpoint:
        """The endpoint a socket address names, remembered."""
        host: str = address[0]
        if host.startswith(_MAPPED_PREFIX) and "." in host:
            host = host[len(_MAPPED_PREFIX) :]
        if len(self._sources) >= _ADDRESSES_KEPT:
            self._sources.clear()
        source = self._sources[address] = (host, address[1])
        return source

    def _destination(self, endpoint: Endpoint) -> tuple[str, int]:
        """The socket address to send to endpoint, remembered."""
        host, port = endpoint
        if self.dual_stack and ":" not in host:
            host = _MAPPED_PREFIX + host
        if len(self._destinations) >= _ADDRESSES_KEPT:
            self._destinations.clear()
        destination = self._destinations[endpoint] = (host, port)
        return destination

    def _send_gso(self, train: list[bytes], size: int, endpoint: Endpoint) -> None:
        destination = self._destinations.get(endpoint) or self._destination(endpoint)
        control = [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))]
        try:
            self._sender.sendmsg(train, control, 0, destination)
            self.gso_sends += 1
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                self.send_errors += len(train)
                return
            self.gso = False
            self.gso_off_reason = "a GSO send failed with EIO (the device cannot segment)"
        for data in train:
            self.send(data, endpoint)

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        """Sends one datagram; one that cannot be sent now is dropped, as UDP may."""
        destination = self._destinations.get(endpoint) or self._destination(endpoint)
        try:
            self._sender.sendto(data, destination)
        except OSError:
            self.send_errors += 1

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []
        self.budgeted = None


def _bound(
    family: socket.AddressFamily,
    address: tuple[str, int],
    *,
    reuseport: bool = False,
    receive_buffer: int = SOCKET_BUFFER,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _grow_buffers(sock, receive_buffer)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _steered_group(plain: socket.socket, *, dual_stack: bool) -> tuple[list[socket.socket], str]:
    """The group in place of `plain`, which held the port (so it was nobody else's) and is
    closed here; or no group and why, `plain` kept, if the kernel refuses the program."""
    family = socket.AF_INET6 if dual_stack else socket.AF_INET
    host, port = plain.getsockname()[:2]
    group: list[socket.socket] = []
    try:
        probe = _bound(family, (host, 0), reuseport=True)
        group.append(probe)
        steer.attach(probe, steer.program([], []))
    except OSError as exc:
        for sock in group:
            sock.close()
        return [], str(exc)
    group.pop().close()
    plain.close()
    try:
        for role in steer.ROLES:
            size = BUDGETED_BUFFER if role == steer.BUDGETED else SOCKET_BUFFER
            group.append(_bound(family, (host, port), reuseport=True, receive_buffer=size))
        steer.attach(group[0], steer.program([], []))
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group, ""


def _grow_buffers(sock: socket.socket, receive_buffer: int = SOCKET_BUFFER) -> None:
    for forced, plain, size in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF, receive_buffer),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _try_option(sock: socket.socket, option: int, value: int) -> bool:
    """Sets a UDP-level option; False if this kernel does not have it."""
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True
