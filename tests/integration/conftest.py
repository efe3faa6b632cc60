"""Fixtures for the privileged tier: network namespaces and the real kube-apiserver."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from podwire.sandbox import controlplane
from podwire.sandbox import netns as netns_mod


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, TUN devices and veth links")


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
