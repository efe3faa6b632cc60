"""The chart's Grafana dashboard against live processes: every metric its queries name is one a
running agent (two nodes with a peer each, against the real apiserver) or the running operator
exports, and `promtool check metrics` (built from the Go module proxy by
hack/tools/promtool.sh) passes on the agent's /metrics."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import record, topology
from tests.integration.operator.conftest import Operators, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "helm" / "podwire" / "dashboards" / "podwire.json"
PROMTOOL = ROOT / ".cache" / "tools" / "bin" / "promtool"
METRIC = re.compile(r"\bpodwire_[a-z0-9_]+\b")


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in METRIC.findall(e)}


def exported(text: str) -> set[str]:
    """The series names a query can use: every sample's, and a gauge family's own name (a
    labelled gauge with no series now, as podwire_advisory on a node with nothing to advise,
    is still exported and still queried by name)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}  # fmt: skip
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("# TYPE ") and len(parts) == 4 and parts[3] == "gauge":
            names.add(parts[2])
    return names


def agent_metrics(node: record.Node) -> str:
    """The agent's /metrics, as Prometheus reads it on the node's address."""
    script = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://{node.underlay_ip}:9871/metrics', timeout=5)"
        ".read().decode(), end='')\n"
    )
    return node.ns.run(sys.executable, "-c", script).stdout


def _ready_with_peer(cluster: topology.Cluster, name: str) -> bool:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    status = json.loads(out.stdout).get("status", {})
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
    )
    return ready and status.get("peers") == 1


@pytest.fixture
def live(cluster: topology.Cluster, operators: Operators) -> tuple[str, str]:
    """The /metrics text of node1's agent (with a peer it has handshaken with) and of the
    leading operator."""
    nodes = [cluster.add_node(f"node{i}") for i in (1, 2)]
    for node in nodes:
        cluster.start_agent(node)
    op = operators.start("op-metrics")
    netns_mod.wait_until(
        lambda: all(_ready_with_peer(cluster, n.name) for n in nodes),
        timeout=60,
        what="both agents Ready with their peer",
    )
    assert nodes[0].pods[0].ns.ping(nodes[1].pods[0].ip, count=2, timeout=10)
    wait_for(op.leading, timeout=20, what="the operator leading")
    code, operator_text = op.get("/metrics")
    assert code == 200
    return agent_metrics(nodes[0]), operator_text


def test_every_metric_the_dashboard_queries_is_exported_live(live: tuple[str, str]) -> None:
    agent_text, operator_text = live
    wanted = dashboard_metrics()
    assert len(wanted) >= 20, wanted
    agent, operator = exported(agent_text), exported(operator_text)
    for name in sorted(wanted):
        source = operator if name.startswith("podwire_operator_") else agent
        assert name in source, f"the dashboard queries {name}, which no live process exports"
    # The check above is not vacuous: a misspelt counter (no _total) is caught.
    assert "podwire_reconciles" not in agent and "podwire_reconciles_total" in agent
    # The peer figures are there because a handshake happened.
    assert re.search(r'^podwire_peer_handshake_age_seconds\{peer="node2"\}', agent_text, re.M)


def test_promtool_check_metrics_passes_on_the_live_agent(live: tuple[str, str]) -> None:
    agent_text, operator_text = live
    assert PROMTOOL.exists(), "promtool is not built: run hack/tools/promtool.sh"
    for what, text in (("agent", agent_text), ("operator", operator_text)):
        proc = subprocess.run(
            [str(PROMTOOL), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (
            f"promtool on the {what}'s /metrics: {proc.stdout}{proc.stderr}"
        )
    bad = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input="# TYPE x counter\nx{a=b} 1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0  # promtool does refuse what is not the exposition format
