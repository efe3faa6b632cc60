"""Three podwire agents, each in its node's namespace, encrypt pod traffic between them.

The topology is sandbox.topology's: nodes on one underlay bridge, two pods behind each node,
the real apiserver, the userspace engine as the datapath.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools, topology


def _ready(cluster: topology.Cluster, names: list[str]) -> bool:
    out = cluster.cp.kubectl("get", "wgnodes", "-o", "json", check=False)
    if out.returncode != 0:
        return False
    items = {i["metadata"]["name"]: i for i in json.loads(out.stdout)["items"]}
    for n in names:
        conds = items.get(n, {}).get("status", {}).get("conditions", [])
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return False
    return True


def _peers_of(node: topology.Node) -> list[dict]:
    proc = node.ns.run("wg", "show", node.device, "dump", check=False)
    lines = proc.stdout.strip().splitlines()[1:]
    return [
        dict(
            zip(["public_key", "psk", "endpoint", "allowed_ips"], line.split("\t")[:4], strict=True)
        )
        for line in lines
    ]


@pytest.fixture
def three(cluster: topology.Cluster) -> topology.Cluster:
    for i in (1, 2, 3):
        cluster.add_node(f"node{i}")
    for node in cluster.nodes.values():
        cluster.start_agent(node)
    netns_mod.wait_until(
        lambda: _ready(cluster, ["node1", "node2", "node3"]), timeout=60, what="three Ready wgnodes"
    )
    return cluster


def test_three_agents_encrypt_pod_to_pod_traffic(three: topology.Cluster) -> None:
    n1, n2, n3 = (three.nodes[f"node{i}"] for i in (1, 2, 3))
    src = n1.pods[0]
    for dst in (n2.pods[0], n3.pods[1]):
        assert src.ns.ping(dst.ip, count=3, timeout=10), f"{src.name} cannot reach {dst.name}"

    # The traffic went through the tunnels: handshakes and bytes on node1's device.
    peers = _peers_of(n1)
    assert len(peers) == 2
    assert {p["allowed_ips"] for p in peers} == {n2.pod_cidr, n3.pod_cidr}
    assert {p["endpoint"] for p in peers} == {
        f"{n2.underlay_ip}:{topology.LISTEN_PORT}",
        f"{n3.underlay_ip}:{topology.LISTEN_PORT}",
    }

    out = three.cp.kubectl("get", "wgnodes").stdout
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert {"node1", "node2", "node3"} <= {r[0] for r in rows}
    for r in rows:
        if r[0] in ("node1", "node2", "node3"):
            assert "userspace" in r and "True" in r, out


def test_cli_reports_status_and_peers(three: topology.Cluster) -> None:
    import pathlib
    import subprocess
    import sys

    n1 = three.nodes["node1"]
    podwire = str(pathlib.Path(sys.executable).parent / "podwire")
    status = json.loads(
        subprocess.run(
            [podwire, "status", "-o", "json", "--socket", str(n1.api_socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status["node_name"] == "node1"
    assert status["datapath"] == "DATAPATH_USERSPACE"
    assert status["peer_count"] == 2
    assert status["mtu"] > 0
    conditions = {c["type"]: c.get("status", False) for c in status["conditions"]}
    assert conditions["Ready"] and conditions["Encrypted"] and not conditions["PeersRefused"]
    components = {c["name"]: c.get("ok", False) for c in status["components"]}
    assert {"keystore", "datapath", "watches", "reconciler", "publisher"} <= set(components)
    assert all(components.values()), status["components"]
    text = subprocess.run(
        [podwire, "status", "--socket", str(n1.api_socket)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "components:" in text and "reconciler" in text and "2 peers programmed" in text
    assert n1.pods[0].ns.ping(three.nodes["node2"].pods[0].ip, count=2, timeout=10)
    table = subprocess.run(
        [podwire, "peers", "--socket", str(n1.api_socket)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "node2" in table and "node3" in table
    node2_row = next(line for line in table.splitlines() if line.startswith("node2"))
    assert "never" not in node2_row, "node2 shows no handshake"
    key = n1.key_path.read_text().strip()
    assert key not in table and key not in json.dumps(status)


def _watch_for_publication(
    cluster: topology.Cluster, name: str
) -> tuple[threading.Event, list[float]]:
    """Notes the moment the apiserver tells watchers that name's WireguardNode exists."""
    seen = threading.Event()
    when: list[float] = []
    proc = subprocess.Popen(
        [tools.path("kubectl"), f"--kubeconfig={cluster.cp.kubeconfig}", "get", "wgnodes",
         "--watch-only", "-o", "name"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    cluster.factory.processes.append(proc)  # ended by PID with the namespaces

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().endswith(f"/{name}") and not seen.is_set():
                when.append(time.monotonic())
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen, when


def test_a_new_node_is_added_everywhere_within_two_seconds(three: topology.Cluster) -> None:
    published, when = _watch_for_publication(three, "node4")
    time.sleep(1)  # the watch is open before node4 can publish
    n4 = three.add_node("node4", create_object=False)
    three.start_agent(n4)
    # node4's agent waits for its Node, then generates and publishes its key; the others add
    # it once its WireguardNode exists: that is what the 2 s are measured from.
    three.create_node_object(n4)
    assert published.wait(30), "node4's agent never published its WireguardNode"
    others = [three.nodes[f"node{i}"] for i in (1, 2, 3)]
    netns_mod.wait_until(
        lambda: all(len(_peers_of(n)) == 3 for n in others),
        timeout=30,
        interval=0.02,
        what="node4 to be programmed on every node",
    )
    took = time.monotonic() - when[0]
    print(f"node4 programmed on three nodes {took:.3f}s after publication")
    assert took < 2.0, f"node4 was programmed everywhere {took:.2f}s after it published"
    assert three.nodes["node1"].pods[0].ns.ping(n4.pods[0].ip, count=2, timeout=10)


def test_a_deleted_node_is_removed_everywhere(three: topology.Cluster) -> None:
    three.delete_node("node3")
    netns_mod.wait_until(
        lambda: all(len(_peers_of(three.nodes[n])) == 1 for n in ("node1", "node2")),
        timeout=15,
        what="node3's peer to be removed",
    )
    n1 = three.nodes["node1"]

    def routes() -> str:
        return n1.ns.ip("route", "show", "table", "all", "dev", n1.device).stdout

    netns_mod.wait_until(
        lambda: three.nodes["node3"].pod_cidr not in routes(), timeout=5, what="the route to go"
    )
    assert three.nodes["node2"].pod_cidr in routes()
    # With node3's peer gone, its pods' range falls to the fail-closed route: dropped, not sent.
    assert not n1.pods[0].ns.ping(three.nodes["node3"].pods[0].ip, count=1, timeout=2)
