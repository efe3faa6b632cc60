"""What an operator sees of a running agent: fail-closed on the wire, probes, metrics, rotation.

Agents run in node namespaces against the real apiserver (sandbox.topology); every check is
made from outside the agent: a capture on the underlay bridge, HTTP from inside the node's
namespace, the gRPC socket, kubectl.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import grpc
from underlay import capture_underlay

from podwire.agent import keys
from podwire.api.podwire.v1 import agent_pb2, agent_pb2_grpc
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology

METRICS_PORT = 9871


def _wgnode(cluster: topology.Cluster, name: str) -> dict | None:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _condition(cluster: topology.Cluster, name: str, kind: str) -> str | None:
    obj = _wgnode(cluster, name) or {}
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return str(c["status"])
    return None


def _wait_ready(cluster: topology.Cluster, *names: str) -> None:
    """Each named node Ready with the others as its peers: Ready alone says the agent runs
    with its device up, not yet that the others are programmed (their routes come with them)."""

    def ready_with_peers(name: str) -> bool:
        status = (_wgnode(cluster, name) or {}).get("status", {})
        return (
            _condition(cluster, name, "Ready") == "True" and status.get("peers") == len(names) - 1
        )

    netns_mod.wait_until(
        lambda: all(ready_with_peers(n) for n in names),
        timeout=60,
        what=f"{', '.join(names)} Ready with each other as peers",
    )


def _http(node: topology.Node, path: str) -> tuple[int, str]:
    """GET on the agent's HTTP port, from inside the node's namespace (where kubelet would be)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}{path}', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    proc = node.ns.run(sys.executable, "-c", code, check=False)
    if proc.returncode != 0 or not proc.stdout:
        return 0, proc.stderr
    status, _, body = proc.stdout.partition("\n")
    return int(status), body


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def test_fail_closed_keeps_traffic_to_an_unprogrammed_node_off_the_wire(
    cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    """node3 is a Node but runs no agent, so no peer covers its pods. Both node1 and node2
    have a default route via node3, as a real node has a gateway: node1 (fail-closed) keeps
    its pods' packets to node3 in; node2 (fail-closed off, the control) sends them in clear."""
    n1, n2, n3 = (cluster.add_node(f"node{i}") for i in (1, 2, 3))
    for node in (n1, n2):
        node.ns.ip("route", "add", "default", "via", n3.underlay_ip)
    cluster.start_agent(n1)
    cluster.start_agent(n2, fail_closed=False)
    _wait_ready(cluster, "node1", "node2")
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=2, timeout=10), "the tunnel itself works"

    capture, pcap = capture_underlay(cluster, tmp_path)
    try:
        for src in (n1.pods[0], n2.pods[0]):
            src.ns.ping(n3.pods[0].ip, count=3, timeout=2, interval=0.2)
            src.ns.run(
                "timeout",
                "2",
                "bash",
                "-c",
                f"echo hello >/dev/tcp/{n3.pods[0].ip}/80",
                check=False,
            )
    finally:
        netns_mod.stop_process(capture)
    seen = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True, check=True
    ).stdout
    from_node2 = [line for line in seen.splitlines() if f"{n2.pods[0].ip} >" in line]
    from_node1 = [line for line in seen.splitlines() if f"{n1.pods[0].ip} >" in line]
    assert from_node2, "the control saw no plaintext, so the capture proves nothing"
    assert not from_node1, "node1 sent pod traffic in clear:\n" + "\n".join(from_node1)
    # The refusal is visible where an operator looks: node1 has one peer, not two.
    assert (_wgnode(cluster, "node1") or {}).get("status", {}).get("peers") == 1


def test_readyz_waits_for_the_node_and_metrics_count_the_traffic(
    cluster: topology.Cluster,
) -> None:
    n1 = cluster.add_node("node1", create_object=False)
    n2 = cluster.add_node("node2")
    cluster.start_agent(n2)
    cluster.start_agent(n1)
    netns_mod.wait_until(
        lambda: _http(n1, "/healthz")[0] == 200, timeout=30, what="node1's agent to serve"
    )
    # node1's agent is alive, but without its Node it cannot publish or program: not ready.
    code, body = _http(n1, "/readyz")
    assert code == 503, body
    assert "not ready" in body
    cluster.create_node_object(n1)
    netns_mod.wait_until(lambda: _http(n1, "/readyz")[0] == 200, timeout=30, what="/readyz 200")

    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=5, timeout=10, interval=0.1)
    code, text = _http(n1, "/metrics")
    assert code == 200
    assert _metric(text, "podwire_peers") == 1
    assert (_metric(text, "podwire_reconciles_total") or 0) >= 1
    assert _metric(text, "podwire_reconcile_errors_total") == 0
    assert (_metric(text, "podwire_peer_tx_bytes_total", peer="node2") or 0) > 5 * 84
    assert (_metric(text, "podwire_peer_rx_bytes_total", peer="node2") or 0) > 5 * 84
    age = _metric(text, "podwire_peer_handshake_age_seconds", peer="node2")
    assert age is not None and 0 <= age < 60
    assert n1.key_path.read_text().strip() not in text


def test_rotate_key_over_the_local_api(cluster: topology.Cluster) -> None:
    n1, n2 = cluster.add_node("node1"), cluster.add_node("node2")
    for node in (n1, n2):
        cluster.start_agent(node)
    _wait_ready(cluster, "node1", "node2")
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=2, timeout=10)
    old_public = keys.load(n2.key_path).public_key_b64()
    old_private = n2.key_path.read_text().strip()

    with grpc.insecure_channel(f"unix:{n2.api_socket}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        reply = stub.RotateKey(agent_pb2.RotateKeyRequest(), timeout=30)
        status = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)

    new = keys.load(n2.key_path)  # the file holds the new key, still 0600
    assert reply.public_key == new.public_key_b64() != old_public
    assert status.public_key == reply.public_key
    assert os.stat(n2.key_path).st_mode & 0o777 == 0o600
    assert abs(reply.rotated_at.seconds - time.time()) < 60
    obj = _wgnode(cluster, "node2") or {}
    assert obj["spec"]["publicKey"] == reply.public_key
    netns_mod.wait_until(
        lambda: (_wgnode(cluster, "node2") or {}).get("status", {}).get("keyRotatedAt"),
        timeout=15,
        what="status.keyRotatedAt",
    )
    # node1 follows the new key from its watch, and traffic flows again.
    netns_mod.wait_until(
        lambda: reply.public_key in n1.ns.run("wg", "show", n1.device, "peers").stdout,
        timeout=10,
        what="node1 to program node2's new key",
    )
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=2, timeout=15)
    log = (n2.workdir / "agent.log").read_text()
    for secret in (old_private, n2.key_path.read_text().strip()):
        assert secret not in log
