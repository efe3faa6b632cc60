"""The agent's HTTP server (probes and /metrics) stays up for the kubelet whatever a client does.

It runs on the node's host network, so a client that connects and says nothing, or many that
connect at once, must not use up the agent's threads: requests time out, and connections past
a bound are closed at once. The bind address is a setting. Loopback only.
"""

from __future__ import annotations

import pathlib
import socket
import time
import urllib.request
from collections.abc import Iterator

import agentfakes
import pytest

from podwire.agent import config, metrics


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[metrics.HttpServer]:
    harness = agentfakes.AgentHarness(tmp_path / "key" / "private.key")
    harness.start()
    srv = metrics.HttpServer(
        harness.agent, port=0, host="127.0.0.1", request_timeout=0.5, max_connections=4
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _get(srv: metrics.HttpServer, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.bound_port}{path}", timeout=5) as r:
        return int(r.status)


def _connect(srv: metrics.HttpServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.bound_port), timeout=5)
    return s


def test_a_silent_client_is_disconnected_after_the_request_timeout(
    server: metrics.HttpServer,
) -> None:
    silent = _connect(server)
    started = time.monotonic()
    try:
        assert silent.recv(1) == b""  # the server closed it
    finally:
        silent.close()
    assert time.monotonic() - started < 3


def test_connections_past_the_bound_are_closed_and_probes_answer_again_after(
    server: metrics.HttpServer,
) -> None:
    idle = [_connect(server) for _ in range(4)]
    time.sleep(0.1)
    extra = _connect(server)
    try:
        assert extra.recv(1) == b"", "a fifth connection was kept"
    finally:
        extra.close()
    for s in idle:
        s.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert _get(server, "/healthz") == 200
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_bind_address_is_a_setting() -> None:
    assert config.Config(node_name="n", fail_closed=False).metrics_address == "0.0.0.0"
    env = {"NODE_NAME": "n", "PODWIRE_FAIL_CLOSED": "false", "PODWIRE_METRICS_ADDRESS": "::1"}
    assert config.load(environ=env).metrics_address == "::1"
    with pytest.raises(config.ConfigError, match="metrics_address"):
        config.Config(node_name="n", fail_closed=False, metrics_address="not-an-address")
