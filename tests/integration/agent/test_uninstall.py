"""`helm uninstall` on one node, seen from the node: an agent armed by the uninstall request
removes everything of podwire's as it stops; one not armed leaves it all for the next agent.

node1 and node2 run real agents with two lanes each (two podwire-engine children per node) in
their namespaces, strictMode and fail-closed on (the defaults). What is looked at is what `ip`
shows in node1's namespace: links, routes of podwire's protocol in every table, both families,
podwire's rules, and the multipath hash the lanes set. The request comes as the chart's pre-delete hook makes it:
`podwire prepare-uninstall`, which names the node whose agent is down and exits 0.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from podwire.agent.datapath import uapi
from podwire.agent.netlink import routes as nl_routes
from podwire.agent.netlink import rules as nl_rules
from podwire.api import wgnode
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology

LANES = {"PODWIRE_LANES": "2"}
PODWIRE = str(pathlib.Path(sys.executable).with_name("podwire"))


def _condition(cluster: topology.Cluster, name: str, kind: str) -> str:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    obj = json.loads(out.stdout) if out.returncode == 0 else {}
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return f"{c['status']}/{c['reason']}"
    return ""


def _wait(cluster: topology.Cluster, name: str, kind: str, want: str) -> None:
    netns_mod.wait_until(
        lambda: _condition(cluster, name, kind) == want,
        timeout=120,
        what=f"{name} {kind} {want}",
    )


def _podwire_state(node: topology.Node) -> dict[str, list[str]]:
    """What of podwire's `ip` shows in the node's namespace."""
    ns = node.ns
    links = [
        line
        for line in ns.ip("-d", "-o", "link", "show").stdout.splitlines()
        if f" {node.device}" in line
    ]
    routes = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "route", "show", "table", "all").stdout.splitlines()
        if f"proto {nl_routes.PROTO}" in line or node.device in line
    ]
    priorities = (f"{nl_rules.INBOUND_PRIORITY}:", f"{nl_rules.LOOKUP_PRIORITY}:")
    rules = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "rule", "show").stdout.splitlines()
        if line.startswith(priorities)
    ]
    return {"links": sorted(links), "routes": sorted(routes), "rules": sorted(rules)}


def _engines_alive(node: topology.Node) -> list[str]:
    return [
        d
        for d in (node.device, f"{node.device}_1")
        if uapi.UapiClient(d, socket_dir=topology.UAPI_DIR).alive()
    ]


def _hash_policy(node: topology.Node) -> str:
    return node.ns.run("sysctl", "-n", "net.ipv4.fib_multipath_hash_policy").stdout.strip()


def test_only_an_armed_agent_clears_the_node_when_it_stops(cluster: topology.Cluster) -> None:
    n1, n2 = (cluster.add_node(f"node{i}") for i in (1, 2))
    for n in (n1, n2):
        cluster.start_agent(n, env=LANES)
    for n in ("node1", "node2"):
        _wait(cluster, n, wgnode.READY, "True/Ready")
    made = _podwire_state(n1)
    assert len(made["links"]) == 2, made  # both lanes' devices
    assert any(line.startswith("unreachable 10.244.0.0/16") for line in made["routes"]), made
    assert any(n2.pod_cidr in line for line in made["routes"]), made  # the peer's route
    assert made["rules"], made  # strictMode's lookup and inbound rules
    assert _hash_policy(n1) == "1"

    # Not armed: a stop (a restart, an upgrade) leaves everything as it is.
    cluster.stop_agent(n1)
    assert _podwire_state(n1) == made
    assert _engines_alive(n1) == [n1.device, f"{n1.device}_1"]
    assert _condition(cluster, "node1", wgnode.UNINSTALL_ARMED) == ""

    # Armed by the uninstall request, the next stop removes it all but the key folder.
    cluster.start_agent(n1, env=LANES)
    _wait(cluster, "node1", wgnode.READY, "True/Ready")
    cluster.stop_agent(n2)  # a node whose agent is down must not block the uninstall
    cli = subprocess.run(
        [
            PODWIRE,
            "prepare-uninstall",
            "--timeout",
            "8s",
            "--kubeconfig",
            str(cluster.cp.kubeconfig),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "node node1: armed" in cli.stdout
    assert "not armed within 8 s: node2" in cli.stderr
    _wait(cluster, "node1", wgnode.UNINSTALL_ARMED, "True/Armed")
    cluster.stop_agent(n1)
    assert _podwire_state(n1) == {"links": [], "routes": [], "rules": []}
    assert _engines_alive(n1) == []
    assert _hash_policy(n1) == "0"
    assert n1.key_path.exists()
    assert "uninstall_cleanup_done" in (n1.workdir / "agent.log").read_text()
