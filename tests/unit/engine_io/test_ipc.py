"""The UAPI socket without root: opening it over a stale or live socket, framing, answers."""

from __future__ import annotations

import errno
import pathlib
import socket
import stat
import time

import pytest

from podwire.agent.engine import ipc, uapi


def handler(request: uapi.Request) -> str:
    if isinstance(request, uapi.GetRequest):
        return "listen_port=1\n"
    if request.listen_port == 9:
        raise uapi.UapiError("taken", errno=errno.EADDRINUSE)
    return ""


def test_socket_and_directory_modes(tmp_path: pathlib.Path) -> None:
    path = ipc.socket_path("wgx", directory=tmp_path / "wireguard")
    listener = ipc.open_listener(path)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        ipc.remove_socket(path, listener)
    assert not path.exists()


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "wgx.sock"
    live = ipc.open_listener(path)
    with pytest.raises(ipc.SocketInUseError):
        ipc.open_listener(path)
    live.close()  # a crash: the file stays, nobody answers
    assert path.exists()
    again = ipc.open_listener(path)
    ipc.remove_socket(path, again)


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "wgx.sock"
    path.write_text("mine")
    with pytest.raises(ipc.SocketInUseError):
        ipc.open_listener(path)
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (b"get=1\n\n", b"listen_port=1\nerrno=0\n\n"),
        (b"set=1\nlisten_port=2\n\n", b"errno=0\n\n"),
        (b"set=1\nlisten_port=9\n\n", b"errno=98\n\n"),
        (b"set=1\nlisten_port=x\n\n", b"errno=22\n\n"),
        (b"hello\n\n", b"errno=22\n\n"),
    ],
)
def test_answer(request_bytes: bytes, answer: bytes) -> None:
    assert ipc.answer(request_bytes, handler) == answer


def _connection() -> tuple[ipc.UapiConnection, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    return ipc.UapiConnection(ours, handler), theirs


def test_requests_split_and_joined_across_reads() -> None:
    connection, client = _connection()
    with client:
        client.sendall(b"get=1\n")
        connection.on_readable()
        assert not connection.wants_write
        client.sendall(b"\nset=1\nlisten_port=zz\n\nget=1\n\n")
        connection.on_readable()
        expected = b"listen_port=1\nerrno=0\n\nerrno=22\n\nlisten_port=1\nerrno=0\n\n"
        assert _read(client, len(expected)) == expected
        client.shutdown(socket.SHUT_WR)
        connection.on_readable()
        assert connection.finished
    connection.close()


def test_an_endless_request_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "MAX_REQUEST", 1000)
    connection, client = _connection()
    with client:
        client.sendall(b"set=1\n" + b"x" * 2000)
        connection.on_readable()
        assert _read(client, 10) == b"errno=22\n\n"
        assert connection.finished
    connection.close()


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _big_set(size: int) -> bytes:
    line = b"public_key=" + b"ab" * 32 + b"\nallowed_ip=10.0.0.1/32\n"
    return b"set=1\n" + line * (size // len(line)) + b"\n"


def test_a_trickled_huge_request_costs_linear_time() -> None:
    """Each read looks for the blank line only in what it brought (not the whole inbox again),
    so a 2 MB request in 128-byte pieces is framed in about the time its reads take."""
    connection, client = _connection()
    request = _big_set(2 * 1024 * 1024)
    with client:
        started = time.perf_counter()
        for i in range(0, len(request), 128):
            client.sendall(request[i : i + 128])
            connection.on_readable()
        elapsed = time.perf_counter() - started
        assert _read(client, 9) == b"errno=0\n\n"
    connection.close()
    assert elapsed < 1.5


def test_the_outbox_is_bounded_for_a_client_that_does_not_read() -> None:
    body = "x=" + "y" * 65536 + "\n"
    ours, client = socket.socketpair()
    ours.setblocking(False)
    client.settimeout(5)
    connection = ipc.UapiConnection(ours, lambda request: body)
    with client:
        client.sendall(b"get=1\n\n" * 400)
        connection.on_readable()
        # The connection stops reading (and answering) while its outbox is full...
        assert connection.outbox_size <= ipc.MAX_OUTBOX + len(body) + 16
        assert not connection.wants_read
        # ...and answers every request once the client reads.
        answer = len(body) + len("errno=0\n\n")
        received = 0
        while received < 400 * answer:
            chunk = client.recv(1 << 20)
            received += len(chunk)
            connection.on_writable()
            if connection.wants_read:
                connection.on_readable()
        assert received == 400 * answer
    connection.close()
