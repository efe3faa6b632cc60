"""podwire.agent.kube against the real kube-apiserver: paged lists, watches, 410, events."""

from __future__ import annotations

import threading
import uuid

import pytest

from podwire.agent import kube
from podwire.sandbox import controlplane
from podwire.sandbox.netns import wait_until


def _node(name: str, ip: str, cidr: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"podwire.io/test": "kube"}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }


@pytest.fixture
def client(apiserver: controlplane.ControlPlane) -> kube.Client:
    return kube.Client(kubeconfig=str(apiserver.kubeconfig))


def _create_node(client: kube.Client, name: str, cidr: str) -> dict:
    return client._json(client.core.create_node, _node(name, "", cidr), what="creating node")


def test_informer_lists_then_follows_adds_updates_and_deletes(client: kube.Client) -> None:
    prefix = f"inf-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        _create_node(client, f"{prefix}-{i}", f"10.{i}.0.0/24")
    changes = threading.Event()
    inf = kube.Informer(client, "nodes", on_change=changes.set, resync_period=60)
    inf.start()
    try:
        wait_until(lambda: inf.synced, timeout=10, what="the first list")
        names = {o["metadata"]["name"] for o in inf.snapshot()}
        assert {f"{prefix}-{i}" for i in range(3)} <= names
        # Raw JSON with camelCase keys, as the reconcile logic reads it.
        assert inf.objects[f"{prefix}-1"]["spec"]["podCIDRs"] == ["10.1.0.0/24"]

        _create_node(client, f"{prefix}-new", "10.9.0.0/24")
        wait_until(lambda: f"{prefix}-new" in inf.objects, timeout=5, what="the added node")

        client._json(
            client.core.patch_node,
            f"{prefix}-new",
            {"metadata": {"labels": {"x": "y"}}},
            what="patch",
        )
        wait_until(
            lambda: inf.objects[f"{prefix}-new"]["metadata"]["labels"].get("x") == "y",
            timeout=5,
            what="the update",
        )

        client._json(client.core.delete_node, f"{prefix}-0", what="delete")
        wait_until(lambda: f"{prefix}-0" not in inf.objects, timeout=5, what="the deletion")
    finally:
        inf.stop()


def test_paged_list_returns_every_object(
    client: kube.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"page-{uuid.uuid4().hex[:6]}"
    for i in range(7):
        _create_node(client, f"{prefix}-{i}", f"10.{100 + i}.0.0/24")
    monkeypatch.setattr(kube, "LIST_PAGE", 2)  # force several pages
    items, rv = client.list_all("nodes")
    assert {f"{prefix}-{i}" for i in range(7)} <= {o["metadata"]["name"] for o in items}
    assert int(rv) > 0


def test_a_watch_from_a_compacted_resource_version_is_gone(client: kube.Client) -> None:
    name = f"gone-{uuid.uuid4().hex[:6]}"
    old_rv = _create_node(client, name, "10.201.0.0/24")["metadata"]["resourceVersion"]
    inf = kube.Informer(client, "nodes", on_change=lambda: None)

    def gone() -> bool:
        # Keep history moving so that the apiserver's compaction passes old_rv.
        client._json(
            client.core.patch_node,
            name,
            {"metadata": {"labels": {"t": uuid.uuid4().hex}}},
            what="patch",
        )
        try:
            inf._watch_once(old_rv, timeout_seconds=1)
        except kube.Gone:
            return True
        return False

    wait_until(gone, timeout=60, interval=1, what="the apiserver to compact past the old version")


def test_errors_name_the_call_and_the_status(client: kube.Client) -> None:
    assert client.get_node("no-such-node") is None
    with pytest.raises(kube.KubeError) as err:
        client._json(
            client.core.create_node,
            {"metadata": {"name": "Bad_Name"}},
            what="creating Node Bad_Name",
        )
    assert err.value.status == 422
    assert "creating Node Bad_Name" in str(err.value)


def test_events_are_recorded_against_the_object(
    client: kube.Client, apiserver: controlplane.ControlPlane
) -> None:
    node = _create_node(client, f"ev-{uuid.uuid4().hex[:6]}", "10.200.0.0/24")
    client.emit_event(
        involved=node, reason="DuplicatePublicKey", message="refused", event_type="Warning"
    )
    out = apiserver.kubectl(
        "get",
        "events",
        "-n",
        "default",
        f"--field-selector=involvedObject.name={node['metadata']['name']}",
    ).stdout
    assert "DuplicatePublicKey" in out and "Warning" in out
