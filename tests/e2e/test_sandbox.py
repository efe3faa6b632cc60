"""The newcomer's first five minutes: `podwire sandbox up`, `status`, `verify`, `down`.

Every pod reaches every other across a 3-node sandbox, and a capture on the underlay proves the
traffic between nodes is encrypted; the same capture, with encryption taken away for one pair,
does see plaintext.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools


def test_up_brings_a_three_node_cluster_all_pods_reachable_and_encrypted(
    sandbox: Any, cli: Any
) -> None:
    print(f"`podwire sandbox up` to every pod pair reachable: {sandbox.up_seconds:.1f}s")
    kubeconfig = sandbox.state.kubeconfig
    assert f"kubeconfig: {kubeconfig}" in sandbox.up_output
    assert "kubectl get wgnodes" in sandbox.up_output

    # What the guide says to type works: kubectl, from the tools folder, shows three Ready nodes.
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PATH": f"{tools.BUILT}:{os.environ['PATH']}"}
    table = subprocess.run(
        ["kubectl", "get", "wgnodes"], capture_output=True, text=True, env=env, check=True
    ).stdout
    rows = [line.split() for line in table.strip().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == ["node1", "node2", "node3"], table
    assert all("True" in r and "userspace" in r for r in rows), table

    # A second `up` says that one runs, and touches nothing.
    before = sandbox.state
    second = cli(sandbox.directory, "sandbox", "up")
    assert second.returncode == 1
    assert "already running" in second.stderr and "podwire sandbox down" in second.stderr
    assert [(p.pid, p.start_time) for p in sandbox.state.processes] == [
        (p.pid, p.start_time) for p in before.processes
    ]

    status = json.loads(cli(sandbox.directory, "sandbox", "status", "-o", "json").stdout)
    assert status["running"] and status["kubeconfig"] == kubeconfig
    assert [(n["name"], n["datapath"], n["ready"]) for n in status["nodes"]] == [
        (f"node{i}", "userspace", True) for i in (1, 2, 3)
    ]
    for n in status["nodes"]:
        assert n["namespace"] and n["underlay_ip"] and n["pod_cidr"]
        assert sorted(p["node"] for p in n["peers"]) == sorted(
            {"node1", "node2", "node3"} - {n["name"]}
        )
        assert all(p["latest_handshake"] for p in n["peers"]), n["peers"]
    assert len(status["pods"]) == 6
    assert len(status["connectivity"]) == 30
    unreachable = [c for c in status["connectivity"] if not c["ok"]]
    assert not unreachable

    # The operator: two replicas under the chart's RBAC, one leading (the other waits).
    def operators() -> list[dict]:
        got = json.loads(cli(sandbox.directory, "sandbox", "status", "-o", "json").stdout)
        return list(got["operators"])

    netns_mod.wait_until(
        lambda: sum(o["leader"] for o in operators()) == 1, timeout=30, what="one operator leads"
    )
    assert [(o["identity"], o["alive"], o["ready"]) for o in operators()] == [
        ("operator1", True, True),
        ("operator2", True, True),
    ]

    table = cli(sandbox.directory, "sandbox", "status").stdout
    assert "30/30 pod pairs reachable" in table and "FAIL" not in table
    assert "OPERATOR" in table and "operator1" in table

    proof = cli(sandbox.directory, "sandbox", "verify", "-o", "json")
    assert proof.returncode == 0, proof.stdout + proof.stderr
    report = json.loads(proof.stdout)
    enc, ctl = report["encrypted"], report["control"]
    assert enc["passed"] and not enc["failures"]
    assert enc["analysis"]["clear"] == 0 and enc["analysis"]["payload"] == 0
    assert enc["analysis"]["wireguard"]["transport"] >= enc["sent"]
    # The control: the same capture and analysis do catch a pair sent in clear.
    assert ctl["passed"] and ctl["analysis"]["clear"] > 0 and ctl["analysis"]["payload"] > 0
    # ... and the control's routes are gone: the pair is encrypted again.
    again = cli(sandbox.directory, "sandbox", "verify", "-o", "json")
    assert json.loads(again.stdout)["encrypted"]["analysis"]["clear"] == 0


def test_a_failed_up_names_the_step_and_leaves_nothing(
    tmp_path: pathlib.Path, nothing_left: Any
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: the sandbox makes network namespaces")
    directory = tmp_path / "sandbox"
    # An engine that cannot start: the agents fail, so `up` does, halfway through.
    env = {**os.environ, "PODWIRE_SANDBOX_DIR": str(directory), "PODWIRE_ENGINE": "/bin/false"}
    before = _namespaces()
    podwire = pathlib.Path(sys.executable).parent / "podwire"
    done = subprocess.run(
        [str(podwire), "sandbox", "up", "--runtime", "process", "--nodes", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, out + err
    assert "step 'nodes Ready' failed" in err, err
    assert "agent of node" in err and "removed" in err, err
    assert "starting 2 agents" in out  # it got that far, and said so
    assert _namespaces() - before == set()
    nothing_left(directory)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("pws")}
