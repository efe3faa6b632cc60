"""The real kube-apiserver serves custom resources: create, watch, and `kubectl get`."""

from __future__ import annotations

import queue
import threading
import time

import kubernetes
import pytest

from podwire.sandbox import controlplane

GROUP = "testbed.podwire.io"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            }
                        },
                    }
                },
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"}
                ],
            }
        ],
    },
}


@pytest.fixture
def api(apiserver: controlplane.ControlPlane) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(apiserver.kubeconfig))


def _wait_established(ext: kubernetes.client.ApiextensionsV1Api, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} was not established")


def test_custom_resource_round_trip(
    apiserver: controlplane.ControlPlane, api: kubernetes.client.ApiClient
) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(CRD)
    _wait_established(ext, CRD["metadata"]["name"])

    objs = kubernetes.client.CustomObjectsApi(api)
    created = objs.create_cluster_custom_object(
        GROUP,
        "v1",
        "gadgets",
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Gadget",
            "metadata": {"name": "g1"},
            "spec": {"size": 1},
        },
    )
    rv = created["metadata"]["resourceVersion"]

    # Watch from the object's resourceVersion in a thread, then change it: the watch must see it.
    seen: queue.Queue[dict] = queue.Queue()
    w = kubernetes.watch.Watch()

    def watch() -> None:
        for ev in w.stream(
            objs.list_cluster_custom_object,
            GROUP,
            "v1",
            "gadgets",
            resource_version=rv,
            timeout_seconds=20,
        ):
            seen.put(ev)
            if ev["type"] == "MODIFIED":
                w.stop()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    objs.patch_cluster_custom_object(GROUP, "v1", "gadgets", "g1", {"spec": {"size": 7}})
    ev = seen.get(timeout=20)
    assert ev["type"] == "MODIFIED"
    assert ev["object"]["spec"]["size"] == 7
    t.join(5)

    # The schema is enforced by the apiserver itself, not by us.
    with pytest.raises(kubernetes.client.ApiException) as err:
        objs.patch_cluster_custom_object(GROUP, "v1", "gadgets", "g1", {"spec": {"size": 0}})
    assert err.value.status == 422

    out = apiserver.kubectl("get", "gadgets").stdout
    lines = out.strip().splitlines()
    assert lines[0].split() == ["NAME", "SIZE"]
    assert lines[1].split()[:2] == ["g1", "7"]


def test_service_account_token_is_authenticated_and_authorized_by_rbac(
    apiserver: controlplane.ControlPlane, tmp_path: pytest.TempPathFactory
) -> None:
    apiserver.kubectl("create", "namespace", "tokens")
    apiserver.kubectl("create", "serviceaccount", "reader", "-n", "tokens")
    token = apiserver.mint_token("tokens", "reader")
    kc = apiserver.kubeconfig_for_token(token, tmp_path / "reader.kubeconfig")  # type: ignore[operator]
    core = kubernetes.client.CoreV1Api(
        kubernetes.config.new_client_from_config(config_file=str(kc))
    )

    # Authenticated (the token is valid) but not yet authorized: RBAC is really in force.
    with pytest.raises(kubernetes.client.ApiException) as err:
        core.list_node()
    assert err.value.status == 403
    assert "system:serviceaccount:tokens:reader" in err.value.body

    apiserver.kubectl("create", "clusterrole", "node-reader", "--verb=list", "--resource=nodes")
    apiserver.kubectl(
        "create",
        "clusterrolebinding",
        "node-reader",
        "--clusterrole=node-reader",
        "--serviceaccount=tokens:reader",
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            core.list_node()
            break
        except kubernetes.client.ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
