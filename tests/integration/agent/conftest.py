"""A cluster of node namespaces with the real apiserver and the WireguardNode CRD installed."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from podwire.sandbox import controlplane, netns, topology


@pytest.fixture
def cluster(
    crds: controlplane.ControlPlane, netns: netns.NetnsFactory, tmp_path: pathlib.Path
) -> Iterator[topology.Cluster]:
    c = topology.Cluster(netns, crds, tmp_path)
    try:
        yield c
    finally:
        # Agents first, so they do not react to the clean-up; then the Node objects, cluster
        # state shared by the session's apiserver: leave none behind.
        for node in c.nodes.values():
            c.stop_agent(node)
        for name in list(c.nodes):
            crds.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
            crds.kubectl(
                "delete", "wgnode", name, "--ignore-not-found", "--wait=false", check=False
            )
