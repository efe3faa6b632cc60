"""A node writes only its own WireguardNode, and keeps it: the chart's admission policy on the
real apiserver, with agents that authenticate as a cluster's do.

Each agent holds a token for the chart's ServiceAccount bound to a Pod on its own Node
(`topology.Cluster.agent_kubeconfig`), so the apiserver names the node in it; the chart's RBAC
and its ValidatingAdmissionPolicy are in force. node1's credentials stand for a compromised
node: they must not change node2's object, which node2's agent, and an admin, still can; what an
admin changes, node2's agent puts back.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from podwire.sandbox import controlplane, tools, topology
from podwire.sandbox import netns as netns_mod

CHART = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "helm" / "podwire"
RELEASE = "podwire"
ACCOUNT = f"{RELEASE}-agent"
POLICY = f"{RELEASE}-agent-own-wgnode"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"


def _chart_objects(namespace: str) -> str:
    """Everything the chart renders but the DaemonSet (its agents are the test's processes)."""
    rendered = subprocess.run(
        [
            tools.path("helm"), "template", RELEASE, str(CHART), "-n", namespace,
            "--set", f"agent.clusterPodCIDRs={topology.POD_SUPERNET}",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return "\n---\n".join(d for d in rendered.split("\n---\n") if "kind: DaemonSet" not in d)


@pytest.fixture
def chart(crds: controlplane.ControlPlane) -> Iterator[str]:
    """The chart's objects in a namespace of the test's own; the namespace's name."""
    # Without kube-controller-manager a deleted namespace stays Terminating: one name per test.
    namespace = f"podwire-admission-{uuid.uuid4().hex[:8]}"
    objects = _chart_objects(namespace)
    assert "kind: ValidatingAdmissionPolicyBinding" in objects
    crds.kubectl("create", "namespace", namespace)
    crds.kubectl("apply", "-f", "-", input=objects)
    try:
        _wait_in_force(crds, namespace)
        yield namespace
    finally:
        crds.kubectl("delete", "--ignore-not-found", "-f", "-", input=objects, check=False)
        crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def two(cluster: topology.Cluster, chart: str) -> dict[str, pathlib.Path]:
    """node1 and node2, each agent with its Pod-bound credentials, both Ready: their kubeconfigs."""
    kubeconfigs = {}
    for name in ("node1", "node2"):
        node = cluster.add_node(name, pods=1)
        kubeconfigs[name] = cluster.agent_kubeconfig(node, chart, ACCOUNT)
        cluster.start_agent(node, env={"KUBECONFIG": str(kubeconfigs[name])})
    netns_mod.wait_until(
        lambda: all(_ready(cluster.cp, n) for n in kubeconfigs),
        timeout=90,
        what="both agents Ready with the chart's RBAC and policy",
    )
    return kubeconfigs


def _body(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "podwire.io/v1alpha1",
            "kind": "WireguardNode",
            "metadata": {"name": name},
            "spec": {"publicKey": "A" * 43 + "=", "listenPort": 51871},
        }
    )


def _wait_in_force(cp: controlplane.ControlPlane, namespace: str) -> None:
    """Returns once the apiserver's admission enforces the policy (it loads it a moment after
    it is created): a dry run by a token bound to nothing is refused."""
    token = cp.kubeconfig_for_token(
        cp.mint_token(namespace, ACCOUNT), cp.workdir / f"{namespace}.kubeconfig"
    )

    def refused() -> bool:
        dry = cp.kubectl(
            "create", "--dry-run=server", "-f", "-", input=_body("probe"), check=False,
            kubeconfig=token,
        )  # fmt: skip
        return dry.returncode != 0 and POLICY in dry.stderr

    netns_mod.wait_until(refused, timeout=30, what="the admission policy in force")
    token.unlink()


def _wgnode(cp: controlplane.ControlPlane, name: str) -> dict:
    out = cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _ready(cp: controlplane.ControlPlane, name: str) -> bool:
    conds = _wgnode(cp, name).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _patch(
    cp: controlplane.ControlPlane, name: str, patch: dict, *args: str, as_: pathlib.Path | None
) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(
        "patch", "wgnode", name, "--type=merge", "-p", json.dumps(patch), *args,
        check=False, kubeconfig=as_,
    )  # fmt: skip


def test_a_token_bound_to_a_pod_on_a_node_names_the_node(
    cluster: topology.Cluster, chart: str
) -> None:
    node = cluster.add_node("node1", pods=0)
    user = cluster.cp.whoami(cluster.agent_kubeconfig(node, chart, ACCOUNT))
    assert user["username"] == f"system:serviceaccount:{chart}:{ACCOUNT}"
    assert user["extra"][NODE_NAME_CLAIM] == ["node1"]
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [f"{ACCOUNT}-node1"]


def test_a_node_may_write_only_its_own_wireguardnode(
    cluster: topology.Cluster, two: dict[str, pathlib.Path]
) -> None:
    cp, rogue = cluster.cp, two["node1"]
    port = _wgnode(cp, "node2")["spec"]["listenPort"]
    forged = {"spec": {"listenPort": 51999}}
    spec = _patch(cp, "node2", forged, as_=rogue)
    assert spec.returncode != 0, "node1's agent rewrote node2's WireguardNode"
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in spec.stderr
    assert "the agent of node node1 may write only WireguardNode node1, not node2" in spec.stderr
    status = _patch(cp, "node2", {"status": {"peers": 0}}, "--subresource=status", as_=rogue)
    assert status.returncode != 0 and POLICY in status.stderr
    gone = cp.kubectl("delete", "wgnode", "node2", "--wait=false", check=False, kubeconfig=rogue)
    assert gone.returncode != 0, "node1's agent deleted node2's WireguardNode"  # RBAC's "no"
    assert _wgnode(cp, "node2")["spec"]["listenPort"] == port

    # node2's own agent may, and so may an admin (dry run: the agent would put it back).
    own = _patch(cp, "node2", forged, "--dry-run=server", as_=two["node2"])
    assert own.returncode == 0, own.stderr
    admin = _patch(cp, "node2", forged, "--dry-run=server", as_=None)
    assert admin.returncode == 0, admin.stderr


def test_a_token_not_bound_to_a_node_may_write_no_wireguardnode(
    cluster: topology.Cluster, chart: str, tmp_path: pathlib.Path
) -> None:
    # What the sandbox's agents held before: one token for the account, bound to nothing.
    token = cluster.cp.mint_token(chart, ACCOUNT)
    loose = cluster.cp.kubeconfig_for_token(token, tmp_path / "loose.kubeconfig")
    made = cluster.cp.kubectl(
        "create", "-f", "-", input=_body("node9"), check=False, kubeconfig=loose
    )
    if made.returncode == 0:
        cluster.cp.kubectl("delete", "wgnode", "node9", check=False)
    assert made.returncode != 0, "a token bound to no node created a WireguardNode"
    assert POLICY in made.stderr and "not bound to a Pod on a Node" in made.stderr


def test_a_spec_an_admin_changed_is_put_back_by_the_nodes_agent(
    cluster: topology.Cluster, two: dict[str, pathlib.Path]
) -> None:
    cp = cluster.cp
    ours = _wgnode(cp, "node2")["spec"]
    changed = _patch(cp, "node2", {"spec": {"listenPort": 51999}}, as_=None)
    assert changed.returncode == 0, changed.stderr
    netns_mod.wait_until(
        lambda: _wgnode(cp, "node2")["spec"] == ours,
        timeout=30,
        what="node2's agent to put its spec back",
    )

    def reported() -> bool:
        out = cp.kubectl(
            "get", "events", "-n", "default", "-o", "json",
            "--field-selector", "involvedObject.name=node2,reason=SpecRepaired",
        ).stdout  # fmt: skip
        items = json.loads(out)["items"]
        return any(e["type"] == "Warning" and "51999" in e["message"] for e in items)

    netns_mod.wait_until(reported, timeout=15, what="a Warning Event on node2's WireguardNode")
    log = (cluster.nodes["node2"].workdir / "agent.log").read_text()
    assert "wireguardnode_repaired" in log
    assert (
        "wireguardnode_repaired" not in (cluster.nodes["node1"].workdir / "agent.log").read_text()
    )
