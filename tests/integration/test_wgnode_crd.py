"""The WireguardNode CRD in the real kube-apiserver: schema, status subresource, printer columns."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from podwire.agent import keys, kube
from podwire.api import wgnode
from podwire.sandbox import controlplane
from podwire.sandbox.netns import wait_until


@pytest.fixture(scope="module")
def client(crds: controlplane.ControlPlane) -> Iterator[kube.Client]:
    yield kube.Client(kubeconfig=str(crds.kubeconfig))
    # The apiserver is the session's: leave no WireguardNode or Node of this module behind.
    crds.kubectl("delete", "wgnodes", "--all", check=False)
    crds.kubectl("delete", "nodes", "-l", "podwire.io/test=crd", check=False)


def _pub() -> str:
    return keys.PrivateKey.generate().public_key_b64()


def _node(client: kube.Client, name: str) -> dict:
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"podwire.io/test": "crd"}},
    }
    return client._json(client.core.create_node, body, what="creating node")


def test_agent_body_is_accepted_and_printed_by_kubectl(
    client: kube.Client, apiserver: controlplane.ControlPlane
) -> None:
    name = f"wg-{uuid.uuid4().hex[:6]}"
    node = _node(client, name)
    res = wgnode.new(name, node["metadata"]["uid"], _pub(), listen_port=51871)
    created = client.create_wgnode(res.to_dict())
    assert created["metadata"]["ownerReferences"][0]["kind"] == "Node"

    read = wgnode.WireguardNode.from_dict(created)
    status = wgnode.Status(
        endpoint="192.0.2.10:51871",
        pod_cidrs=("10.244.1.0/24", "fd00:10:244:1::/64"),
        conditions=wgnode.set_condition(
            (), wgnode.READY, "True", "PeersProgrammed", now=wgnode.format_time(1_767_225_600.0)
        ),
        datapath="userspace",
        features=(),
        peers=2,
        lanes=1,
        advisories=(
            wgnode.Advisory("init_on_alloc", "boot with init_on_alloc=0"),
            wgnode.Advisory("threaded_napi", "turn threaded_napi on"),
        ),
    )
    body = read.status_body()
    body["status"] = status.to_dict()
    client.replace_wgnode_status(body)

    out = apiserver.kubectl("get", "wgnodes", name).stdout.splitlines()
    assert out[0].split() == [
        "NAME",
        "PUBLIC",
        "KEY",
        "ENDPOINT",
        "POD",
        "CIDRS",
        "DATAPATH",
        "PEERS",
        "LANES",
        "READY",
        "ADVISORIES",
        "KEY",
        "AGE",
        "AGE",
    ]
    row = out[1].split()
    assert row[0] == name and row[1] == res.spec.public_key
    assert row[2] == "192.0.2.10:51871"
    assert "10.244.1.0/24" in row[3] and "fd00:10:244:1::/64" in row[3]
    assert row[4:8] == ["userspace", "2", "1", "True"], "the Lanes column shows status.lanes"
    assert row[8] == "2", "the Advisories column counts status.advisories"
    got = wgnode.WireguardNode.from_dict(client.get_wgnode(name))
    assert got.status is not None and got.status.advisories == status.advisories
    # The short name works too.
    assert name in apiserver.kubectl("get", "wgnode", name).stdout


@pytest.mark.parametrize(
    "public_key",
    [
        base64.b64encode(b"\x01" * 31).decode(),
        base64.b64encode(b"\x01" * 33).decode(),
        "!" * 43 + "=",
        "",
    ],
)
def test_schema_refuses_a_key_that_is_not_32_bytes(client: kube.Client, public_key: str) -> None:
    body = {
        "apiVersion": wgnode.API_VERSION,
        "kind": wgnode.KIND,
        "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
        "spec": {"publicKey": public_key, "listenPort": 51871},
    }
    with pytest.raises(kube.KubeError) as err:
        client.create_wgnode(body)
    assert err.value.status == 422
    assert "publicKey" in str(err.value)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_schema_refuses_a_port_out_of_range(client: kube.Client, port: int) -> None:
    body = {
        "apiVersion": wgnode.API_VERSION,
        "kind": wgnode.KIND,
        "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
        "spec": {"publicKey": _pub(), "listenPort": port},
    }
    with pytest.raises(kube.KubeError) as err:
        client.create_wgnode(body)
    assert err.value.status == 422


def test_a_real_wireguard_key_is_accepted(client: kube.Client) -> None:
    raw = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    name = f"ok-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": wgnode.API_VERSION,
        "kind": wgnode.KIND,
        "metadata": {"name": name},
        "spec": {"publicKey": base64.b64encode(raw).decode(), "listenPort": 51871},
    }
    client.create_wgnode(body)
    assert client.get_wgnode(name) is not None


def test_replace_of_a_stale_object_conflicts(client: kube.Client) -> None:
    name = f"cf-{uuid.uuid4().hex[:6]}"
    first = client.create_wgnode(wgnode.new(name, "uid", _pub()).to_dict())
    client.patch_wgnode_metadata(
        name, {"metadata": {"annotations": {wgnode.ROTATE_ANNOTATION: "now"}}}
    )
    stale = wgnode.WireguardNode.from_dict(first)
    with pytest.raises(kube.KubeError) as err:
        client.replace_wgnode(stale.to_dict())
    assert err.value.status == 409


def test_informer_follows_wireguardnodes(client: kube.Client) -> None:
    inf = kube.Informer(client, "wgnodes", on_change=lambda: None)
    inf.start()
    try:
        wait_until(lambda: inf.synced, timeout=10, what="the first list")
        name = f"inf-{uuid.uuid4().hex[:6]}"
        client.create_wgnode(wgnode.new(name, "uid", _pub()).to_dict())
        wait_until(lambda: name in inf.objects, timeout=5, what="the new WireguardNode")
        client.delete_wgnode(name)
        wait_until(lambda: name not in inf.objects, timeout=5, what="its deletion")
    finally:
        inf.stop()
