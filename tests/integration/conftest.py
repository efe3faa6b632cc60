"""Fixtures for the privileged tier: network namespaces, the real kube-apiserver, a cluster of
node namespaces for real agents, and a namespace of its own for real operators."""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from podwire.sandbox import controlplane, topology
from podwire.sandbox import netns as netns_mod
from tests.integration.operator.conftest import Operators


def _require_root() -> None:
    if os.geteuid() != 0:
        # A fail, not a skip: a skipped privileged test would count as passed and prove nothing.
        pytest.fail("needs root: network namespaces, TUN devices and veth links")


@pytest.fixture
def netns() -> Iterator[netns_mod.NetnsFactory]:
    """Makes namespaces, veth links and processes; removes every one of them afterwards."""
    _require_root()
    with netns_mod.factory() as factory:
        yield factory


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    """etcd and a real kube-apiserver on loopback, with their own certificates; one per session."""
    workdir = pathlib.Path(tmp_path_factory.mktemp("controlplane"))
    # Compacting often, and serving Node watches from etcd rather than the watch cache (which
    # keeps recent history past a compaction), makes 410 Gone, and so the informers' relist,
    # an everyday event here.
    cp = controlplane.ControlPlane(
        workdir, compaction_interval="5s", extra_args=["--watch-cache-sizes=nodes#0"]
    )
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def crds(apiserver: controlplane.ControlPlane) -> controlplane.ControlPlane:
    """The session's apiserver with podwire's CRDs (the chart's crds/) installed."""
    apiserver.install_crds()
    return apiserver


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()
LOG_TAIL = 60  # lines of each agent's log shown when a test fails


@pytest.fixture
def cluster(
    crds: controlplane.ControlPlane,
    netns: netns_mod.NetnsFactory,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
) -> Iterator[topology.Cluster]:
    c = topology.Cluster(netns, crds, tmp_path)
    try:
        yield c
    finally:
        if request.node.stash.get(_FAILED, False):
            # What the agents said is what explains a failure seen once in CI.
            for node in c.nodes.values():
                _print_node_state(node)
        # Agents first, so they do not react to the clean-up; then the Node objects, cluster
        # state shared by the session's apiserver: leave none behind.
        for node in c.nodes.values():
            c.stop_agent(node)
        c.remove_sockets()  # /var/run/wireguard is the machine's: leave no engine's socket there
        for name in list(c.nodes):
            crds.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
            crds.kubectl(
                "delete", "wgnode", name, "--ignore-not-found", "--wait=false", check=False
            )


def _print_node_state(node: topology.Node) -> None:
    """What explains a failure seen once in CI: the agent's and the engine's logs, and what
    the node's namespace holds (WireGuard peers and handshakes, rules, every table's routes)."""
    logs = [node.workdir / "agent.log", node.key_path.parent / f"{node.device}-engine.log"]
    for log in logs:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        print(f"\n--- {node.name}: {log.name}, last {LOG_TAIL} lines ---")
        print("\n".join(lines[-LOG_TAIL:]))
    for args in (
        ["wg", "show", node.device],
        ["ip", "rule"],
        ["ip", "route", "show", "table", "all"],
    ):
        done = subprocess.run(
            ["ip", "netns", "exec", node.netns, *args], capture_output=True, text=True, timeout=10
        )
        print(f"--- {node.name}: {' '.join(args)} ---\n{done.stdout}{done.stderr}")


@pytest.fixture
def namespace(crds: controlplane.ControlPlane) -> Iterator[str]:
    # Without kube-controller-manager a deleted namespace stays Terminating: one name per test.
    name = f"podwire-op-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        crds.kubectl("delete", "lease", "--all", "-n", name, "--ignore-not-found", check=False)
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operators(
    crds: controlplane.ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> Iterator[Operators]:
    ops = Operators(crds, namespace, tmp_path)
    try:
        yield ops
    finally:
        ops.stop_all()
