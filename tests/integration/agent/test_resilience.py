"""What an operator relies on: restarts lose nothing, bad nodes are refused and flagged."""

from __future__ import annotations

import json
import subprocess

import pytest

from podwire.agent import keys
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology


def _wgnode(cluster: topology.Cluster, name: str) -> dict:
    return json.loads(cluster.cp.kubectl("get", "wgnode", name, "-o", "json").stdout)


def _ready(cluster: topology.Cluster, name: str, *, peers: int | None = None) -> bool:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    status = json.loads(out.stdout).get("status", {})
    if peers is not None and status.get("peers") != peers:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


@pytest.fixture
def two(cluster: topology.Cluster) -> topology.Cluster:
    for i in (1, 2):
        cluster.start_agent(cluster.add_node(f"node{i}"))
    # Ready says the agent's components are healthy, not that it has seen the other node yet.
    netns_mod.wait_until(
        lambda: _ready(cluster, "node1", peers=1) and _ready(cluster, "node2", peers=1),
        timeout=60,
        what="both nodes Ready, each with the other as its peer",
    )
    return cluster


def test_agent_restart_keeps_key_and_loses_no_packet(two: topology.Cluster) -> None:
    n1, n2 = two.nodes["node1"], two.nodes["node2"]
    src, dst = n1.pods[0], n2.pods[0]
    assert src.ns.ping(dst.ip, count=2, timeout=10)
    key_before = keys.load(n2.key_path).public_key_b64()
    rv_before = _wgnode(two, "node2")["metadata"]["resourceVersion"]

    # 100 packets a second for 6 s, while node2's agent is stopped and started again.
    ping = subprocess.Popen(
        src.ns.exec_args(["ping", "-n", "-q", "-i", "0.01", "-c", "600", "-W", "1", dst.ip]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        two.stop_agent(n2)
        two.start_agent(n2)
        out, _ = ping.communicate(timeout=60)
    finally:
        if ping.poll() is None:
            ping.kill()
    assert " 0% packet loss" in out, out
    assert "600 received" in out, out

    netns_mod.wait_until(lambda: _ready(two, "node2"), timeout=30, what="node2 Ready again")
    assert keys.load(n2.key_path).public_key_b64() == key_before
    after = _wgnode(two, "node2")
    assert after["spec"]["publicKey"] == key_before
    assert after["metadata"]["resourceVersion"] == rv_before, (
        "the restart rewrote the WireguardNode"
    )


def _fake_node(
    cluster: topology.Cluster, name: str, *, ip: str | None, cidr: str, key: str
) -> None:
    addresses = [{"type": "InternalIP", "address": ip}] if ip else []
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDRs": [cidr]},
    }
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(node))
    cluster.cp.kubectl(
        "patch", "node", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"addresses": [*addresses, {"type": "Hostname", "address": name}]}}),
    )  # fmt: skip
    wg = {
        "apiVersion": "podwire.io/v1alpha1",
        "kind": "WireguardNode",
        "metadata": {"name": name},
        "spec": {"publicKey": key, "listenPort": 51871},
    }
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(wg))


def test_conflicting_and_incomplete_nodes_are_refused_and_the_rest_keeps_working(
    two: topology.Cluster,
) -> None:
    fakes = ["dup-a", "dup-b", "ovl-a", "ovl-b", "noip"]
    shared = keys.PrivateKey.generate().public_key_b64()
    try:
        _fake_node(two, "dup-a", ip="192.0.2.101", cidr="10.244.101.0/24", key=shared)
        _fake_node(two, "dup-b", ip="192.0.2.102", cidr="10.244.102.0/24", key=shared)
        _fake_node(
            two,
            "ovl-a",
            ip="192.0.2.103",
            cidr="10.244.103.0/24",
            key=keys.PrivateKey.generate().public_key_b64(),
        )
        _fake_node(
            two,
            "ovl-b",
            ip="192.0.2.104",
            cidr="10.244.103.128/25",
            key=keys.PrivateKey.generate().public_key_b64(),
        )
        _fake_node(
            two,
            "noip",
            ip=None,
            cidr="10.244.105.0/24",
            key=keys.PrivateKey.generate().public_key_b64(),
        )

        def refused() -> set[str]:
            conds = _wgnode(two, "node1").get("status", {}).get("conditions", [])
            cond = next((c for c in conds if c["type"] == "PeersRefused"), None)
            if not cond or cond["status"] != "True":
                return set()
            return set(cond["message"].removeprefix("refused: ").split(", "))

        netns_mod.wait_until(
            lambda: refused() == set(fakes), timeout=20, what="all five to be refused"
        )

        events = json.loads(two.cp.kubectl("get", "events", "-n", "default", "-o", "json").stdout)[
            "items"
        ]
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        assert {("dup-a", "DuplicatePublicKey"), ("dup-b", "DuplicatePublicKey")} <= reasons
        assert {("ovl-a", "OverlappingPodCIDR"), ("ovl-b", "OverlappingPodCIDR")} <= reasons
        assert ("noip", "MissingInternalIP") in reasons

        # None of them is programmed; node1 and node2 still talk.
        dump = two.nodes["node1"].ns.run("wg", "show", two.nodes["node1"].device, "dump").stdout
        assert shared not in dump
        assert len(dump.strip().splitlines()) == 2  # the device line and node2
        assert (
            two.nodes["node1"].pods[0].ns.ping(two.nodes["node2"].pods[1].ip, count=2, timeout=10)
        )
    finally:
        for name in fakes:
            two.cp.kubectl("delete", "node", name, "--ignore-not-found", check=False)
            two.cp.kubectl("delete", "wgnode", name, "--ignore-not-found", check=False)
