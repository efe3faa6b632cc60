"""The operator's part of the chart, as the real helm renders it and the real apiserver takes it,
and the operator running with the chart's RBAC and nothing more: if the ClusterRole or the Roles
missed a verb it needs, it would never lead, remove a stale object or flag a conflict."""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from podwire.sandbox import controlplane, tools
from tests.integration.operator.conftest import Objects, Operators, public_key, wait_for

CHART = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "helm" / "podwire"
RELEASE = "podwire"


def _render(namespace: str, *sets: str) -> list[dict[str, Any]]:
    args = [tools.path("helm"), "template", RELEASE, str(CHART), "-n", namespace]
    for s in ("agent.clusterPodCIDRs=10.244.0.0/16", *sets):
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _operator_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]  # fmt: skip


@pytest.fixture
def chart_rbac(crds: controlplane.ControlPlane, namespace: str) -> Iterator[list[dict[str, Any]]]:
    """The chart's operator objects but the Deployment (no kubelet runs its pods here), applied."""
    docs = [d for d in _operator_docs(_render(namespace)) if d["kind"] != "Deployment"]
    text = yaml.safe_dump_all(docs)
    crds.kubectl("apply", "-f", "-", input=text)
    try:
        yield docs
    finally:
        crds.kubectl("delete", "--ignore-not-found", "-f", "-", input=text, check=False)


def test_the_chart_renders_the_operator_and_the_apiserver_accepts_it(
    crds: controlplane.ControlPlane, namespace: str
) -> None:
    docs = _operator_docs(_render(namespace, "operator.keyRotationInterval=720h"))
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "ServiceAccount",
    ]
    dry = crds.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump_all(docs))  # fmt: skip
    applied = json.loads(dry.stdout)["items"]
    deployment = next(i for i in applied if i["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["podwire-operator"]  # the image's tini stays PID 1
    assert container["image"].startswith("ghcr.io/podwire/podwire:")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PODWIRE_KEY_ROTATION_INTERVAL"] == "720h"
    assert env["PODWIRE_ROTATION_DEADLINE"] == "120s"
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(env)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    pdb = next(i for i in applied if i["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_operator_enabled_false_renders_none_of_it() -> None:
    assert _operator_docs(_render("kube-system", "operator.enabled=false")) == []


def test_the_operator_works_with_the_charts_rbac_and_nothing_more(
    crds: controlplane.ControlPlane,
    namespace: str,
    chart_rbac: list[dict[str, Any]],
    operators: Operators,
    objects: Objects,
    tmp_path: pathlib.Path,
) -> None:
    account = f"system:serviceaccount:{namespace}:{RELEASE}-operator"

    def can(*args: str) -> bool:
        proc = crds.kubectl("auth", "can-i", f"--as={account}", *args, check=False)
        return proc.stdout.strip() == "yes"

    assert can("watch", "nodes") and can("delete", "wgnodes.podwire.io")
    assert can("patch", "wgnodes.podwire.io", "--subresource=status")
    assert can("update", "leases/podwire-operator", "-n", namespace)
    # Least privilege: nothing it does not use.
    assert not can("create", "wgnodes.podwire.io")
    assert not can("update", "wgnodes.podwire.io")
    assert not can("update", "nodes") and not can("delete", "nodes")
    assert not can("list", "secrets", "-A")
    assert not can("update", "leases/kube-scheduler", "-n", namespace)
    assert not can("create", "leases", "-n", "default")
    assert can("create", "events", "-n", "default")
    assert not can("create", "events", "-n", "kube-system")

    token = crds.mint_token(namespace, f"{RELEASE}-operator")
    kubeconfig = crds.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig")
    a, b, orphan = objects.name("a"), objects.name("b"), objects.name("orphan")
    key = public_key()
    for i, name in enumerate((a, b), start=1):
        objects.node(name, pod_cidrs=[f"10.254.{i}.0/24"])
        objects.wgnode(name, key=key)
    objects.wgnode(orphan)
    op = operators.start("op-rbac", f"--kubeconfig={kubeconfig}", "--stale-grace=1s")

    wait_for(op.leading, timeout=10, what="leading with the chart's Role")
    wait_for(lambda: objects.get(orphan) is None, timeout=15, what="the orphan removed")
    wait_for(lambda: objects.condition(a, "Conflict"), timeout=10, what="the conflict flagged")
    objects.annotate(a, **{"podwire.io/rotation-queued-at": "2026-01-01T00:00:00Z"})
    wait_for(
        lambda: (
            "podwire.io/rotate-key-requested-at"
            in ((objects.get(a) or {})["metadata"].get("annotations") or {})
        ),
        timeout=10,
        what="the rotation requested",
    )
    assert [e["reason"] for e in objects.events(orphan)] == ["StaleRemoved"]
    log = op.log.read_text()
    assert ": 403 " not in log and "forbidden" not in log.lower(), log
