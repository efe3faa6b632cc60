"""A cluster of node namespaces with the real apiserver and the WireguardNode CRD installed."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from podwire.sandbox import controlplane, netns, topology


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
    netns: netns.NetnsFactory,
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
                log = node.workdir / "agent.log"
                lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                print(f"\n--- {node.name}'s agent.log, last {LOG_TAIL} lines ---")
                print("\n".join(lines[-LOG_TAIL:]))
        # Agents first, so they do not react to the clean-up; then the Node objects, cluster
        # state shared by the session's apiserver: leave none behind.
        for node in c.nodes.values():
            c.stop_agent(node)
        for name in list(c.nodes):
            crds.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
            crds.kubectl(
                "delete", "wgnode", name, "--ignore-not-found", "--wait=false", check=False
            )
