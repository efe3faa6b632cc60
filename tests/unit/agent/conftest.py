"""Builders for the agent's unit tests: Nodes and WireguardNodes as the apiserver sends them
(raw camelCase JSON dicts), fresh WireGuard keys, and the parsed CRD."""

from __future__ import annotations

import base64
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import yaml

from podwire.agent import keys

ROOT = pathlib.Path(__file__).resolve().parents[3]
CRD_PATH = ROOT / "deploy" / "helm" / "podwire" / "crds" / "wireguardnodes.yaml"


# What the factory fixtures return; tests annotate their arguments with these.
NodeFactory = Callable[..., dict[str, Any]]
WgNodeFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def new_public_key() -> Callable[[], str]:
    """A fresh public key, as `wg genkey | wg pubkey` would print it."""
    return lambda: keys.PrivateKey.generate().public_key_b64()


@pytest.fixture
def b64_of_len() -> Callable[[int], str]:
    """Base64 of n bytes: a key of the wrong size."""
    return lambda n: base64.b64encode(bytes(range(n))).decode()


@pytest.fixture
def make_node() -> NodeFactory:
    def build(
        name: str,
        *,
        internal_ips: Sequence[str] = (),
        pod_cidrs: Sequence[str] | None = None,
        uid: str = "",
    ) -> dict[str, Any]:
        addresses = [{"type": "Hostname", "address": name}]
        addresses += [{"type": "InternalIP", "address": ip} for ip in internal_ips]
        spec: dict[str, Any] = {}
        if pod_cidrs is not None:
            spec["podCIDRs"] = list(pod_cidrs)
            if pod_cidrs:
                spec["podCIDR"] = pod_cidrs[0]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": uid or f"uid-{name}"},
            "spec": spec,
            "status": {"addresses": addresses},
        }

    return build


@pytest.fixture
def make_wgnode() -> WgNodeFactory:
    def build(
        name: str, public_key: str, *, listen_port: Any = 51871, status: Any = None
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "apiVersion": "podwire.io/v1alpha1",
            "kind": "WireguardNode",
            "metadata": {"name": name, "uid": f"wg-{name}", "resourceVersion": "7"},
            "spec": {"publicKey": public_key, "listenPort": listen_port},
        }
        if status is not None:
            obj["status"] = status
        return obj

    return build


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    with CRD_PATH.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc
