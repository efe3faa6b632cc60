"""Who runs the userspace engine: in external mode the agent never starts one, it waits for the
engine's DaemonSet to serve the socket, and once it has had an engine it says at once when the
engine is gone (the watchdog's question), rather than starting one or blocking its loop.

A UAPI socket that answers `get` as an engine does stands in for the engine: no root, no TUN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import socket
import threading
from collections.abc import Iterator

import pytest

from podwire.agent import config
from podwire.agent.datapath import select, supervisor, uapi, userspace

DEVICE = "pw_test0"


@contextlib.contextmanager
def engine_socket(path: pathlib.Path) -> Iterator[None]:
    """Answers every request on path as an engine with no peers would, until the block ends."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"listen_port=51871\nerrno=0\n\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        server.close()
        path.unlink()


def _engine(socket_dir: pathlib.Path, *, external: bool = False) -> supervisor.Engine:
    client = uapi.UapiClient(DEVICE, socket_dir=socket_dir, timeout=1)
    # A command that would fail loudly if the agent ran it: external mode must run nothing.
    return supervisor.Engine(DEVICE, client, command=("false",), external=external, start_timeout=5)


def test_external_mode_waits_for_the_engine_and_starts_none(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(tmp_path, external=True)
    sock = tmp_path / f"{DEVICE}.sock"
    waited = threading.Thread(target=engine.ensure_running)
    waited.start()
    waited.join(timeout=0.6)
    assert waited.is_alive(), "returned with no engine serving the socket"
    with engine_socket(sock):
        waited.join(timeout=5)
        assert not waited.is_alive(), "still waiting once the engine serves the socket"
        assert engine.process is None and engine.found
        engine.ensure_running()  # an engine that answers is used as it is
    out = capsys.readouterr().out
    assert "engine_absent" in out and str(sock) in out and "external" in out


def test_external_mode_says_at_once_when_the_engine_it_had_is_gone(tmp_path: pathlib.Path) -> None:
    engine = _engine(tmp_path, external=True)
    with engine_socket(tmp_path / f"{DEVICE}.sock"):
        engine.ensure_running()
    with pytest.raises(uapi.UapiError) as err:
        engine.ensure_running()
    message = str(err.value)
    assert str(tmp_path / f"{DEVICE}.sock") in message
    assert "engine mode external" in message and "fail-closed holds" in message
    assert engine.process is None


def test_child_mode_starts_the_engine_and_reports_its_failure(tmp_path: pathlib.Path) -> None:
    engine = _engine(tmp_path)
    with pytest.raises(uapi.UapiError, match=r"start the engine.*exited with 1"):
        engine.ensure_running()
    assert engine.process is not None and engine.process.returncode == 1


def test_the_userspace_backend_runs_the_engine_mode_it_is_given(tmp_path: pathlib.Path) -> None:
    external = userspace.UserspaceBackend(DEVICE, socket_dir=tmp_path, engine_mode="external")
    assert external.engine.external
    assert not userspace.UserspaceBackend(DEVICE, socket_dir=tmp_path).engine.external


def test_a_stop_ends_the_wait_for_the_engine_at_once(tmp_path: pathlib.Path) -> None:
    # SIGTERM to an agent still waiting for its engine's DaemonSet: it must stop now, not
    # when the kubelet's grace period runs out and it is killed.
    stop = threading.Event()
    engine = _engine(tmp_path, external=True)
    engine.stop = stop
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            engine.ensure_running()
        except uapi.UapiError as e:
            raised.append(e)

    waited = threading.Thread(target=wait)
    waited.start()
    waited.join(timeout=0.5)
    assert waited.is_alive(), "returned with no engine serving the socket"
    stop.set()
    waited.join(timeout=1)
    assert not waited.is_alive(), "still waiting after the stop"
    assert raised and "stopping" in str(raised[0]) and engine.process is None


def test_the_agents_configuration_reaches_the_backend(tmp_path: pathlib.Path) -> None:
    # The chart sets PODWIRE_ENGINE_MODE=external; select.py must hand it to the backend, or
    # an agent that starts before its engine pod tries to start an engine of its own.
    cfg = config.Config(
        node_name="n", datapath="userspace", engine_mode="external", fail_closed=False
    )
    chosen = select.open_backend(cfg, socket_dir=tmp_path)
    assert isinstance(chosen, userspace.UserspaceBackend) and chosen.engine.external
    child = dataclasses.replace(cfg, engine_mode="child")
    chosen = select.open_backend(child, socket_dir=tmp_path)
    assert isinstance(chosen, userspace.UserspaceBackend) and not chosen.engine.external
