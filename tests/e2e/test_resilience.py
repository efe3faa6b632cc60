"""What the cluster does to pod traffic: nodes come and go, agents are updated, the apiserver
goes away, an engine dies. Each test runs its own 3-node sandbox."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Any

from podwire.sandbox import status, supervisor, topology, verify

PODWIRE = str(pathlib.Path(sys.executable).parent / "podwire")
NODES = ("node1", "node2", "node3")


def _ready(sandbox: Any, name: str) -> bool:
    conds = sandbox.wgnodes().get(name, {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _agent_status(sandbox: Any, node: str) -> dict[str, Any] | None:
    sock = pathlib.Path(sandbox.state.node(node).workdir, "agent.sock")
    out = subprocess.run(
        [PODWIRE, "status", "-o", "json", "--socket", str(sock)],
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else None


def _agent_synced(sandbox: Any, node: str, peers: int) -> bool:
    st = _agent_status(sandbox, node)
    return bool(
        st
        and st.get("nodes_synced")
        and st.get("wgnodes_synced")
        and st.get("peer_count", 0) == peers
        and not st.get("last_reconcile_error")
    )


def _no_loss(stream: Any) -> None:
    sent, received, summary = stream.result()
    assert sent == stream.count and received == sent, (
        f"{stream.src.name} -> {stream.dst.name}: {summary}"
    )


def test_a_node_joins_and_one_leaves_under_traffic(sandbox: Any, ping_stream: Any) -> None:
    n1, n2 = sandbox.pod("node1"), sandbox.pod("node2", 1)
    stream = ping_stream(n1, n2, count=2000)  # 20 s at 100 packets a second

    sandbox.api.add_node("node4")
    supervisor.wait_until(lambda: _ready(sandbox, "node4"), timeout=60, what="node4 Ready")
    everyone = ("node1", "node2", "node3", "node4")
    supervisor.wait_until(
        lambda: all(len(sandbox.peers(n)) == 3 for n in everyone),
        timeout=30,
        what="node4 a peer of every node, and every node of node4",
    )
    n4 = sandbox.pod("node4")
    for src in (n1, sandbox.pod("node3", 1)):
        assert src.ns.ping(n4.ip, count=2, timeout=10), f"{src.name} -> {n4.name}"
    assert n4.ns.ping(n2.ip, count=2, timeout=10)

    gone = sandbox.state.node("node3")
    sandbox.api.remove_node("node3")
    supervisor.wait_until(
        lambda: all(len(sandbox.peers(n)) == 2 for n in ("node1", "node2", "node4")),
        timeout=30,
        what="node3 removed as a peer everywhere",
    )
    assert not any(pathlib.Path("/var/run/netns", p.netns).exists() for p in gone.pods)
    assert not pathlib.Path("/var/run/netns", gone.netns).exists()
    # Its pod range now falls to the fail-closed route: dropped, not sent in clear.
    assert not n1.ns.ping(gone.pods[0].ip, count=1, timeout=1)

    assert not stream.done(), "the stream ended before the joins and leaves: make it longer"
    _no_loss(stream)
    status = json.loads(
        subprocess.run(
            [PODWIRE, "sandbox", "status", "-o", "json"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PODWIRE_SANDBOX_DIR": str(sandbox.directory)},
        ).stdout
    )  # fmt: skip
    assert [n["name"] for n in status["nodes"]] == ["node1", "node2", "node4"]
    assert all(c["ok"] for c in status["connectivity"]), status["connectivity"]


def test_rolling_agent_restart_loses_no_packet(sandbox: Any, ping_stream: Any) -> None:
    keys = {n: sandbox.wgnodes()[n]["spec"]["publicKey"] for n in NODES}
    # 100 packets a second across every pair of nodes, while each agent in turn is replaced.
    streams = [
        ping_stream(sandbox.pod(a), sandbox.pod(b, 1), count=2500)
        for a, b in (("node1", "node2"), ("node2", "node3"), ("node3", "node1"))
    ]
    for node in NODES:
        before = sandbox.state.find("agent", node)[0].pid
        sandbox.api.restart("agent", node)
        assert sandbox.state.find("agent", node)[0].pid != before
        supervisor.wait_until(
            lambda node=node: _agent_synced(sandbox, node, peers=2),
            timeout=30,
            what=f"the new agent of {node} synced",
        )
    assert not any(s.done() for s in streams), "a stream ended before the last restart"
    for s in streams:
        _no_loss(s)
    assert {n: sandbox.wgnodes()[n]["spec"]["publicKey"] for n in NODES} == keys


def _watches(sandbox: Any) -> dict[str, int]:
    """Open watches on the apiserver, by resource, from its own metrics."""
    out = sandbox.api.cluster().cp.kubectl("get", "--raw", "/metrics", check=False)
    text = out.stdout if out.returncode == 0 else ""
    counts: dict[str, int] = {}
    for m in re.finditer(
        r'^apiserver_longrunning_requests\{[^}]*resource="(nodes|wgnodes)",[^}]*scope="cluster"'
        r'[^}]*verb="WATCH"[^}]*\} (\d+)',
        text,
        flags=re.M,
    ):
        counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return counts


def _device(sandbox: Any) -> dict[str, dict[str, dict]]:
    return {n: sandbox.peers(n) for n in NODES}


def test_apiserver_away_for_30s_traffic_flows_and_agents_resync_without_churn(
    sandbox: Any, ping_stream: Any
) -> None:
    wgnodes = sandbox.wgnodes()
    versions = {n: wgnodes[n]["metadata"]["resourceVersion"] for n in NODES}
    watches = _watches(sandbox)
    # One watch of each kind per agent, and per operator replica (the one that waits for the
    # Lease keeps its copies warm too).
    watchers = len(NODES) + len(sandbox.state.find("operator"))
    assert watches.get("wgnodes") == watchers, watches
    device = _device(sandbox)
    logs = {n: len(sandbox.agent_log(n)) for n in NODES}

    streams = [
        ping_stream(sandbox.pod(a), sandbox.pod(b, 1), count=700, interval=0.05)  # 35 s
        for a, b in (("node1", "node2"), ("node2", "node3"), ("node3", "node1"))
    ]
    sandbox.api.restart("kube-apiserver", stop_only=True)
    away = time.monotonic()
    assert sandbox.api.cluster().cp.kubectl("get", "wgnodes", check=False).returncode != 0
    supervisor.wait_until(
        lambda: all("watch_failed" in sandbox.agent_log(n)[logs[n] :] for n in NODES),
        timeout=30,
        what="every agent to notice the apiserver is gone",
    )
    # Halfway through, every pod still reaches every other.
    assert all(c["ok"] for c in status.connectivity(sandbox.state))
    time.sleep(max(0.0, 30 - (time.monotonic() - away)))  # the outage itself, not a wait
    sandbox.api.start_again("kube-apiserver")
    returned = time.monotonic()

    # Back: every agent lists and watches again (the apiserver counts their watches). The
    # agents retry with a backoff of up to 30 s (with jitter), so this may take that long.
    supervisor.wait_until(
        lambda: _watches(sandbox) == watches, timeout=90, interval=1, what="the agents' watches"
    )
    print(f"apiserver back; every agent watching again {time.monotonic() - returned:.1f}s later")
    for node in NODES:
        supervisor.wait_until(
            lambda node=node: _agent_synced(sandbox, node, peers=2),
            timeout=30,
            what=f"{node} reconciled",
        )
    for s in streams:
        _no_loss(s)

    # ... and changed nothing: no WireguardNode written, no peer removed or re-added (its
    # counters would start again from zero), no device rebuilt.
    wgnodes = sandbox.wgnodes()
    assert {n: wgnodes[n]["metadata"]["resourceVersion"] for n in NODES} == versions
    after = _device(sandbox)
    for node in NODES:
        assert after[node].keys() == device[node].keys()
        for key, peer in after[node].items():
            old = device[node][key]
            assert (peer["endpoint"], peer["allowed_ips"]) == (old["endpoint"], old["allowed_ips"])
            assert peer["rx"] >= old["rx"] and peer["tx"] >= old["tx"], (node, old, peer)
        since = sandbox.agent_log(node)[logs[node] :]
        for event in ("peer_added", "peer_removed", "peer_updated", "device_lost"):
            assert f'"{event}"' not in since, f"{node}: {event} after the apiserver came back"


def test_engine_killed_nothing_leaks_and_traffic_recovers(
    sandbox: Any, ping_stream: Any, tmp_path: pathlib.Path
) -> None:
    st = sandbox.state
    here, there = sandbox.pod("node2"), sandbox.pod("node1")  # node2's engine dies
    engine = sandbox.api.engine("node2")
    assert engine is not None
    with verify.Capture(st, tmp_path / "engine-killed.pcap") as capture:
        outgoing = ping_stream(here, there, count=1000)  # 10 s, from the node whose engine dies
        incoming = ping_stream(sandbox.pod("node3"), sandbox.pod("node2", 1), count=1000)
        os.kill(engine.pid, signal.SIGKILL)
        killed = time.monotonic()

        def restarted() -> bool:
            new = sandbox.api.engine("node2")
            return new is not None and new.pid != engine.pid

        supervisor.wait_until(restarted, timeout=15, what="the agent to start the engine again")
        back = time.monotonic() - killed
        supervisor.wait_until(
            lambda: here.ns.ping(there.ip, count=1, timeout=1),
            timeout=5,
            what="node2's pods to reach node1's again",
        )
        recovered = time.monotonic() - killed
        # Traffic that the other nodes start towards node2 recovers too; WireGuard on their
        # side keeps its session with the dead engine until it has heard nothing back for 15 s
        # (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT), unless the restored device shakes hands first.
        src, dst = sandbox.pod("node3"), sandbox.pod("node2")
        supervisor.wait_until(
            lambda: src.ns.ping(dst.ip, count=1, timeout=1),
            timeout=30,
            what="node3's pods to reach node2's",
        )
        inbound = time.monotonic() - killed - back
        outgoing.result()
        incoming.result()
        frames = capture.stop()
    print(
        f"engine back {back:.1f}s after the kill; node2 -> node1 traffic after {recovered:.1f}s;"
        f" node3 -> node2 {inbound:.1f}s after the engine was back"
    )
    assert inbound < 5, f"traffic from node3 to node2 took {inbound:.0f}s to recover"

    found = verify.analyze(
        frames, [p.ip for p in st.pods()], b"\0podwire-never-sent\0", topology.LISTEN_PORT
    )
    assert found.clear == 0, f"plaintext on the underlay: {found.examples}"
    assert found.transport > 0
