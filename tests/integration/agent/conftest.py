"""A cluster of node namespaces with the real apiserver and the WireguardNode CRD installed."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from podwire.sandbox import controlplane, netns, topology

CRD = (
    pathlib.Path(__file__).resolve().parents[3]
    / "deploy"
    / "helm"
    / "podwire"
    / "crds"
    / "wireguardnodes.yaml"
)


@pytest.fixture(scope="session")
def crd(apiserver: controlplane.ControlPlane) -> controlplane.ControlPlane:
    apiserver.kubectl("apply", "-f", str(CRD))
    apiserver.kubectl(
        "wait", "--for=condition=Established", "crd/wgnodes.podwire.io", "--timeout=30s"
    )
    return apiserver


@pytest.fixture
def cluster(
    crd: controlplane.ControlPlane, netns: netns.NetnsFactory, tmp_path: pathlib.Path
) -> Iterator[topology.Cluster]:
    c = topology.Cluster(netns, crd, tmp_path)
    try:
        yield c
    finally:
        # Agents first, so they do not react to the clean-up; then the Node objects, cluster
        # state shared by the session's apiserver: leave none behind.
        for node in c.nodes.values():
            c.stop_agent(node)
        for name in list(c.nodes):
            crd.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
            crd.kubectl("delete", "wgnode", name, "--ignore-not-found", "--wait=false", check=False)
