"""A real podwire-engine publishes what it has in force beside its UAPI socket, in
<device>.features (JSON, 0644), which the agent reads for its status; the file goes with the
socket when the engine stops. Run on both fast paths (conftest.fast_path), and with the
offloads off.

ns (this test's): podwire-engine -f DEV  ->  /var/run/wireguard/DEV.sock, DEV.features
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from quiettun import QuietTun

from podwire.agent.datapath import uapi
from podwire.agent.engine import actions as actions_mod
from podwire.agent.engine import device as device_mod
from podwire.agent.engine import ipc, loop
from podwire.agent.engine import udp as udp_mod
from podwire.sandbox import netns as netns_mod

ENGINE = str(pathlib.Path(sys.executable).parent / "podwire-engine")
SOCKET_DIR = pathlib.Path("/var/run/wireguard")


@pytest.fixture
def netns() -> Iterator[netns_mod.NetnsFactory]:
    if os.geteuid() != 0:
        pytest.fail("needs root: a network namespace and a TUN device")
    with netns_mod.factory() as factory:
        yield factory


def _start(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path, env: dict[str, str]
) -> tuple[str, subprocess.Popen[bytes]]:
    ns = netns.namespace("f")
    dev = netns.unique("w")
    proc = netns.spawn(ns, [ENGINE, "-f", dev], log_path=tmp_path / "engine.log", env=env)

    def serving() -> bool:
        assert proc.poll() is None, (tmp_path / "engine.log").read_text()[-2000:]
        return netns_mod.unix_socket_answers(SOCKET_DIR / f"{dev}.sock")

    netns_mod.wait_until(serving, timeout=20, what="the engine to serve")
    return dev, proc


@pytest.mark.parametrize("offloads", ["on", "off"])
def test_the_engine_publishes_its_features_and_removes_them_at_stop(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path, fast_path: str, offloads: str
) -> None:
    env = {"PODWIRE_ENGINE_OFFLOADS": "off"} if offloads == "off" else {}
    dev, proc = _start(netns, tmp_path, env)
    path = SOCKET_DIR / f"{dev}.features"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    published = json.loads(path.read_text())
    assert published["fast_path"] == f"{fast_path}_fastpath"
    if offloads == "on":
        assert {"vnet_hdr", "csum", "tso4", "udp_gso", "udp_gro"} <= set(published["offloads"])
    else:
        # Steering is a socket feature, not an offload: it may stay with the offloads off.
        assert [o for o in published["offloads"] if o != "udp_steering"] == []
    # What the agent's status shows of it.
    shown = uapi.UapiClient(dev).engine_features()
    assert shown[0] == f"engine:{fast_path}_fastpath"
    assert ("engine:udp_gso" in shown) == (offloads == "on")
    assert "private" not in path.read_text()

    netns_mod.stop_process(proc)
    assert proc.returncode == 0
    assert not path.exists()
    assert not (SOCKET_DIR / f"{dev}.sock").exists()
    assert uapi.UapiClient(dev).engine_features() == ("engine:unknown",)


class _RefusesGso:
    """A real loopback UDP socket whose GSO sends the kernel refuses with EIO, as kernels
    before 6.11 do on a device without TX checksumming (this one segments in software, so no
    real socket here gives the EIO; see test_udp_gso)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def sendmsg(self, *_args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def test_gso_turned_off_at_run_time_is_published(tmp_path: pathlib.Path, fast_path: str) -> None:
    sock = _RefusesGso()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)
    tun = QuietTun()
    bind = udp_mod.UdpBind([sock], sock.getsockname()[1], dual_stack=False, offloads=False)  # type: ignore[list-item]
    bind.gso = True
    listener = ipc.open_listener(tmp_path / "wgx.sock")
    path = ipc.features_path(tmp_path / "wgx.sock")
    engine = loop.Engine(
        device=device_mod.Device(rng=os.urandom, wall_clock=time.time),
        tun=tun,  # type: ignore[arg-type]
        bind=bind,
        uapi_listener=listener,
        fast_path=f"{fast_path}_fastpath",
        features_path=path,
    )
    try:
        engine.publish_features()
        assert uapi.UapiClient("wgx", socket_dir=tmp_path).engine_features() == (
            f"engine:{fast_path}_fastpath",
            "engine:udp_gso",
        )
        train = [actions_mod.SendDatagram(bytes(1000), sink.getsockname()) for _ in range(4)]
        engine._perform_batch(train)  # what the loop does with a batch's datagrams
        # The train still left, one datagram at a time, and the file no longer says udp_gso.
        assert [len(sink.recv(2000)) for _ in range(4)] == [1000] * 4
        assert uapi.UapiClient("wgx", socket_dir=tmp_path).engine_features() == (
            f"engine:{fast_path}_fastpath",
        )
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        engine.close()
        ipc.remove_socket(tmp_path / "wgx.sock", listener)
        ipc.remove_features(path)
        tun.close()
        sink.close()
        sock.sock.close()
    assert not any(tmp_path.iterdir())
