"""A real podwire-engine publishes what it has in force beside its UAPI socket, in
<device>.features (JSON, 0644), which the agent reads for its status; the file goes with the
socket when the engine stops. Run on both fast paths (conftest.fast_path), and with the
offloads off.

ns (this test's): podwire-engine -f DEV  ->  /var/run/wireguard/DEV.sock, DEV.features
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from podwire.agent.datapath import uapi
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
