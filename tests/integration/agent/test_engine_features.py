"""`podwire status` shows what the userspace engine has in force, read from what the engine
publishes beside its UAPI socket: its fast path and its offloads, as `engine:<name>` after the
link's features. Two agents on sandbox.topology's nodes, each running its own podwire-engine:
node1's with everything on, node2's with the pure-Python fast path and the offloads off.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology

PODWIRE = str(pathlib.Path(sys.executable).parent / "podwire")


def _status(node: topology.Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODWIRE, "status", *args, "--socket", str(node.api_socket)],
        capture_output=True,
        text=True,
        check=False,
    )


def _features(node: topology.Node) -> list[str]:
    proc = _status(node, "-o", "json")
    if proc.returncode != 0:
        return []
    return list(json.loads(proc.stdout).get("features", []))


@pytest.fixture
def features_files() -> Iterator[list[pathlib.Path]]:
    """Set up before the cluster, so torn down after it: the cluster's clean-up kills the
    engines, which then cannot remove their features files (it removes only their sockets)."""
    paths: list[pathlib.Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


@pytest.fixture
def two(features_files: list[pathlib.Path], cluster: topology.Cluster) -> topology.Cluster:
    for i in (1, 2):
        node = cluster.add_node(f"node{i}")
        features_files.append(topology.UAPI_DIR / f"{node.device}.features")
    cluster.start_agent(cluster.nodes["node1"], env={"PODWIRE_ENGINE_NATIVE": "on"})
    cluster.start_agent(
        cluster.nodes["node2"],
        env={"PODWIRE_ENGINE_NATIVE": "off", "PODWIRE_ENGINE_OFFLOADS": "off"},
    )
    return cluster


def test_status_shows_the_engines_features(two: topology.Cluster) -> None:
    n1, n2 = two.nodes["node1"], two.nodes["node2"]
    for node in (n1, n2):
        netns_mod.wait_until(
            lambda node=node: any(f.startswith("engine:") for f in _features(node)),
            timeout=60,
            what=f"{node.name}'s status to show its engine's features",
        )
    one, other = _features(n1), _features(n2)
    assert "engine:native_fastpath" in one and "engine:python_fastpath" not in one
    assert {"engine:vnet_hdr", "engine:udp_gso", "engine:udp_gro"} <= set(one)
    assert "engine:python_fastpath" in other and "engine:native_fastpath" not in other
    assert [f for f in other if f.startswith("engine:")] in (
        ["engine:python_fastpath"],
        ["engine:python_fastpath", "engine:udp_steering"],
    )
    assert "engine:unknown" not in one + other
    # The text form a user reads.
    text = _status(n1).stdout
    line = next(x for x in text.splitlines() if x.startswith("features:"))
    assert "engine:native_fastpath" in line and "engine:udp_gso" in line
