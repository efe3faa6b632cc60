"""The UAPI socket, /var/run/wireguard/<device>.sock, where `wg` finds a userspace WireGuard.

Opening it follows wireguard-go: the directory is 0700 and the socket 0600; a socket file that
a live engine still answers on means the device is taken, one that nobody answers on is a
leftover of a crash and is replaced. Connections are non-blocking and served by the engine's
one loop: UapiConnection frames requests (a request ends with a blank line), hands each to a
handler and queues the answer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import socket
import stat
from collections.abc import Callable, Mapping

from podwire.agent.engine import uapi

SOCKET_DIR = pathlib.Path("/var/run/wireguard")
# A request larger than this without its blank line is not a `wg` request; the connection is
# answered with EINVAL and closed. (A set for thousands of peers stays far below it.)
MAX_REQUEST = 64 * 1024 * 1024
RECV_SIZE = 65536
BACKLOG = 16
# Answers waiting for a client that does not read: past this, its requests wait unread.
MAX_OUTBOX = 1024 * 1024
# Reads per wakeup of the loop, so that a client sending without pause (a huge request) does
# not keep the loop from the packets: the rest of its request is read at the next wakeup.
READS_PER_WAKEUP = 16


class SocketInUseError(RuntimeError):
    """Another live engine already serves this device's UAPI socket."""


def socket_path(device_name: str, *, directory: pathlib.Path | None = None) -> pathlib.Path:
    return (directory or SOCKET_DIR) / f"{device_name}.sock"


def features_path(socket: pathlib.Path) -> pathlib.Path:
    """Beside the socket, what the engine has in force (see `write_features`): the agent, which
    may not have started this engine, reads it for its status."""
    return socket.with_suffix(".features")


def write_features(path: pathlib.Path, features: Mapping[str, object]) -> None:
    """Replaces the features file atomically, mode 0644: a reader sees the old or the new."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, json.dumps(features, sort_keys=True).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(partial, path)


def remove_features(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def open_listener(path: pathlib.Path, *, listening: bool = True) -> socket.socket:
    """Binds and listens on path, replacing a stale socket; non-blocking, mode 0600. Not
    `listening`: bound only, so nobody finds the engine until the caller calls listen()."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind(listener, path)
        os.chmod(path, 0o600)
        if listening:
            listener.listen(BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _bind(listener: socket.socket, path: pathlib.Path) -> None:
    old_umask = os.umask(0o077)
    try:
        try:
            listener.bind(str(path))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        if _answers(path):
            raise SocketInUseError(f"{path} is in use by a running engine")
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket; remove it by hand")
        path.unlink()
        listener.bind(str(path))
    finally:
        os.umask(old_umask)


def _answers(path: pathlib.Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove_socket(path: pathlib.Path, listener: socket.socket) -> None:
    """Closes the listener and removes its file; no other engine can have bound the path
    while this one answered on it."""
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


Handler = Callable[[uapi.Request], str]


class UapiConnection:
    """One client of the UAPI socket: reads requests, answers each in turn.

    Each read is searched for the blank line that ends a request only where it could be (from
    the end of what was already searched), so a request trickled in byte by byte costs linear
    time; while MAX_OUTBOX bytes of answers wait for the client, nothing more is read from it.
    """

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self._handler = handler
        self._inbox = bytearray()
        self._start = 0  # where the next request begins in the inbox
        self._searched = 0  # no request ends before this offset
        self._outbox = bytearray()
        self.closing = False

    @property
    def wants_read(self) -> bool:
        return not self.closing and len(self._outbox) < MAX_OUTBOX

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    @property
    def finished(self) -> bool:
        """True once the peer hung up (or misbehaved) and every answer has been sent."""
        return self.closing and not self._outbox

    def on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if not self.wants_read:
                break
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.closing = True
                self._outbox.clear()
                break
            if not data:
                self.closing = True
                break
            self._inbox += data
            self._answer_complete_requests()
        self.on_writable()

    def _answer_complete_requests(self) -> None:
        inbox = self._inbox
        while len(self._outbox) < MAX_OUTBOX:
            end = inbox.find(b"\n\n", max(self._start, self._searched))
            if end < 0:
                self._searched = max(self._start, len(inbox) - 1)
                break
            request = bytes(inbox[self._start : end + 2])
            self._start = self._searched = end + 2
            self._outbox += answer(request, self._handler)
        if self._start:
            del inbox[: self._start]
            self._searched -= self._start
            self._start = 0
        if len(inbox) > MAX_REQUEST:
            self._outbox += uapi.format_response(errno=errno.EINVAL)
            inbox.clear()
            self._searched = 0
            self.closing = True

    def on_writable(self) -> None:
        self._flush()
        if self._inbox and not self.closing and len(self._outbox) < MAX_OUTBOX:
            # Requests read while the outbox was full: their turn has come.
            self._answer_complete_requests()
            self._flush()

    def _flush(self) -> None:
        while self._outbox:
            try:
                sent = self.sock.send(self._outbox)
            except BlockingIOError:
                return
            except OSError:
                self._outbox.clear()
                self.closing = True
                return
            del self._outbox[:sent]

    def close(self) -> None:
        self.sock.close()


def answer(request: bytes, handler: Handler) -> bytes:
    """The full answer to one framed request: a malformed one gets its errno, never a raise."""
    try:
        parsed = uapi.parse_request(request)
        body = handler(parsed)
    except uapi.UapiError as exc:
        return uapi.format_response(errno=exc.errno)
    return uapi.format_response(errno=0, body=body)
