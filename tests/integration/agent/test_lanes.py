"""Lanes with real agents: two nodes with `lanes: 2`, each lane a podwire-engine of its own in
the node's namespace, the real apiserver.

Flows between the same two pods on different ports travel on the two lanes (a capture on each
lane's device inside the node maps every flow to one lane, and the underlay shows two UDP port
pairs); a node with one lane beside one with two works over lane 0; a rotation of a two-lane
node loses no datagram on either lane; nothing crosses the underlay in clear.

    pod --- node1 [wg, wg_1] === underlay bridge === [wg, wg_1] node2 --- pod
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from underlay import capture_underlay

from podwire.agent import keys
from podwire.agent.netlink import routes as nl_routes
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools, topology

PODWIRE = str(pathlib.Path(sys.executable).with_name("podwire"))
PYTHON = sys.executable
PORT = 9000  # the receiving pod's UDP port
FLOWS = 8  # source ports 40000.. : with a layer-4 hash, 8 flows land on both lanes but for 2^-7
UAPI_DIR = pathlib.Path("/var/run/wireguard")

# Sends numbered datagrams from FLOWS source ports at `rate` each for `seconds`; each carries
# its flow, its number and a pattern derived from both, so the receiver can tell it intact.
SENDER = """
import json, socket, sys, time
dst, flows, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
socks = []
for k in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 40000 + k))
    socks.append(s)
sent = [0] * flows
start = time.monotonic()
n = 0
while time.monotonic() - start < seconds:
    for k, s in enumerate(socks):
        body = f"{k}:{n}:".encode()
        s.sendto(body + bytes((k * 31 + n + i) % 256 for i in range(300)), (dst, @PORT@))
        sent[k] += 1
    n += 1
    time.sleep(max(0.0, start + n / rate - time.monotonic()))
print(json.dumps(sent))
""".replace("@PORT@", str(PORT))

# Counts what arrives per source port until `seconds` pass with nothing; damaged datagrams
# (a pattern that does not match its header) are counted apart.
RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], @PORT@))
s.settimeout(30)  # the sender's start may be slow; after its first datagram, the idle limit
got, damaged = {}, 0
print("listening", flush=True)
try:
    while True:
        data, (_, sport) = s.recvfrom(2048)
        s.settimeout(float(sys.argv[2]))
        k, n, rest = data.split(b":", 2)
        k, n = int(k), int(n)
        if rest != bytes((k * 31 + n + i) % 256 for i in range(300)):
            damaged += 1
        got[str(sport)] = got.get(str(sport), 0) + 1
except TimeoutError:
    pass
print(json.dumps({"got": got, "damaged": damaged}), flush=True)
""".replace("@PORT@", str(PORT))


def _wgnode(cluster: topology.Cluster, name: str) -> dict:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _settled(cluster: topology.Cluster, lanes: dict[str, int]) -> bool:
    """Every agent Ready, with its lanes published and every other node as a peer."""
    for name, count in lanes.items():
        obj = _wgnode(cluster, name)
        status = obj.get("status", {})
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )
        if not ready or status.get("peers") != len(lanes) - 1 or status.get("lanes") != count:
            return False
        if len(obj.get("spec", {}).get("lanes", [])) != count - 1:
            return False
    return True


def _peers(node: topology.Node, device: str) -> list[tuple[str, str]]:
    """(public key, endpoint) of each peer of one of the node's devices."""
    proc = node.ns.run("wg", "show", device, "dump")
    return [tuple(line.split("\t")[:3:2]) for line in proc.stdout.strip().splitlines()[1:]]  # type: ignore[misc]


def _route(node: topology.Node, cidr: str) -> str:
    """The node's route to cidr, in podwire's table (strictMode, the default)."""
    return node.ns.ip("route", "show", "table", str(nl_routes.TABLE), cidr).stdout


def _cli(node: topology.Node, command: str) -> str:
    return subprocess.run(
        [PODWIRE, command, "--socket", str(node.api_socket)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def _lane(node: topology.Node, lane: int) -> str:
    return node.device if lane == 0 else f"{node.device}_{lane}"


@pytest.fixture
def lanes_cluster(cluster: topology.Cluster) -> Iterator[topology.Cluster]:
    yield cluster
    # Every lane engine's socket (lane 0's too: the topology records it, removes none).
    for node in cluster.nodes.values():
        for lane in range(8):
            (UAPI_DIR / f"{_lane(node, lane)}.sock").unlink(missing_ok=True)


def _start(cluster: topology.Cluster, lanes: dict[str, int]) -> list[topology.Node]:
    nodes = []
    for name in lanes:
        device = cluster.factory.unique("w")
        assert len(device) <= 13, device  # room for the lane suffix
        nodes.append(cluster.add_node(name, device=device))
    for node, count in zip(nodes, lanes.values(), strict=True):
        cluster.start_agent(node, env={"PODWIRE_LANES": str(count)})
    netns_mod.wait_until(lambda: _settled(cluster, lanes), timeout=90, what=f"agents {lanes}")
    return nodes


class Flows:
    """FLOWS UDP flows between two pods, received and checked on the far side."""

    def __init__(
        self,
        cluster: topology.Cluster,
        src: topology.Pod,
        dst: topology.Pod,
        *,
        rate: float,
        seconds: float,
    ) -> None:
        self.receiver = subprocess.Popen(
            dst.ns.exec_args([PYTHON, "-c", RECEIVER, dst.ip, "4"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.receiver.stdout is not None
        assert self.receiver.stdout.readline().strip() == "listening"
        self.sender = subprocess.Popen(
            src.ns.exec_args([PYTHON, "-c", SENDER, dst.ip, str(FLOWS), str(rate), str(seconds)]),
            stdout=subprocess.PIPE,
            text=True,
        )

    def result(self) -> tuple[list[int], dict[str, int], int]:
        """Sent per flow, received per source port, damaged datagrams."""
        try:
            out, _ = self.sender.communicate(timeout=120)
            got, _ = self.receiver.communicate(timeout=120)
        finally:
            for proc in (self.sender, self.receiver):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        received = json.loads(got)
        return json.loads(out), received["got"], received["damaged"]


def _capture(
    cluster: topology.Cluster, ns: netns_mod.Netns, iface: str, expr: str, pcap: pathlib.Path
) -> subprocess.Popen[bytes]:
    log = pcap.with_suffix(".log")
    proc = cluster.factory.spawn(
        ns, ["tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap), expr], log_path=log
    )
    netns_mod.wait_until(lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump")
    return proc


def _read(pcap: pathlib.Path) -> list[str]:
    out = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    return out.stdout.splitlines()


def test_flows_spread_over_two_lanes_each_staying_on_one(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 2})
    # Lane i pairs with lane i: each device has the other node's lane as its one peer.
    spec2 = _wgnode(cluster, "node2")["spec"]
    assert _peers(n1, _lane(n1, 0)) == [(spec2["publicKey"], f"{n2.underlay_ip}:51871")]
    assert _peers(n1, _lane(n1, 1)) == [(spec2["lanes"][0]["publicKey"], f"{n2.underlay_ip}:51872")]
    assert spec2["lanes"][0]["listenPort"] == 51872
    # The route to node2's pods is multipath over both lanes, hashed by layer 4.
    route = _route(n1, n2.pod_cidr)
    assert f"nexthop dev {_lane(n1, 0)}" in route and f"nexthop dev {_lane(n1, 1)}" in route, route
    policy = n1.ns.run("sysctl", "-n", "net.ipv4.fib_multipath_hash_policy").stdout.strip()
    assert policy == "1"
    # kubectl get wgnodes shows the lanes.
    table = cluster.cp.kubectl("get", "wgnodes").stdout.splitlines()
    at = table[0].index("LANES")  # columns are aligned; some headers have spaces
    shown = {row.split()[0]: row[at:].split()[0] for row in table[1:]}
    assert (shown["node1"], shown["node2"]) == ("2", "2"), "\n".join(table)

    # podwire peers shows node2 once per lane.
    peers = _cli(n1, "peers").splitlines()
    assert peers[0].split()[:2] == ["NODE", "LANE"], peers
    assert sorted(row.split()[:2] for row in peers[1:]) == [["node2", "0"], ["node2", "1"]]

    src, dst = n1.pods[0], n2.pods[0]
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    wire = _capture(
        cluster,
        cluster.underlay,
        cluster.bridge,
        f"udp and host {n1.underlay_ip} and host {n2.underlay_ip}",
        tmp_path / "wire.pcap",
    )
    inside = [
        _capture(
            cluster, n1.ns, _lane(n1, lane), f"udp dst port {PORT}", tmp_path / f"l{lane}.pcap"
        )
        for lane in (0, 1)
    ]
    try:
        flows = Flows(cluster, src, dst, rate=50, seconds=2)
        sent, got, damaged = flows.result()
    finally:
        for proc in (clear, wire, *inside):
            netns_mod.stop_process(proc)
    assert damaged == 0
    assert {int(p): n for p, n in got.items()} == {40000 + k: n for k, n in enumerate(sent)}

    # Each flow travelled on one lane; both lanes carried flows.
    by_lane = []
    for lane in (0, 1):
        ports = {
            int(line.split(" > ")[0].rsplit(".", 1)[1])
            for line in _read(tmp_path / f"l{lane}.pcap")
            if f"{src.ip}." in line
        }
        by_lane.append(ports)
    print(f"\nflows by lane: lane 0 {sorted(by_lane[0])}, lane 1 {sorted(by_lane[1])}")
    assert by_lane[0] and by_lane[1], f"the flows did not spread: {by_lane}"
    assert not by_lane[0] & by_lane[1], f"a flow changed lanes: {by_lane[0] & by_lane[1]}"
    assert by_lane[0] | by_lane[1] == {40000 + k for k in range(FLOWS)}
    # The underlay saw two UDP port pairs between the nodes: one per lane.
    pairs = set()
    for line in _read(tmp_path / "wire.pcap"):
        a, b = line.split(" IP ", 1)[1].split(": ", 1)[0].split(" > ")
        pairs.add(tuple(sorted((int(a.rsplit(".", 1)[1]), int(b.rsplit(".", 1)[1])))))
    assert pairs == {(51871, 51871), (51872, 51872)}, pairs
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)


def test_a_node_with_one_lane_beside_one_with_two_talks_over_lane_0(
    lanes_cluster: topology.Cluster,
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 1})
    assert "lanes" not in _wgnode(cluster, "node2")["spec"]  # one lane: the spec as before
    assert _peers(n1, _lane(n1, 1)) == []  # node2 has no lane 1 to pair with
    assert len(_peers(n2, _lane(n2, 0))) == 1
    route = _route(n1, n2.pod_cidr)
    assert f"dev {_lane(n1, 0)}" in route and "nexthop" not in route, route
    for a, b in ((n1, n2), (n2, n1)):
        assert a.pods[0].ns.ping(b.pods[1].ip, count=3, timeout=10), f"{a.name} -> {b.name}"
    flows = Flows(cluster, n1.pods[0], n2.pods[0], rate=50, seconds=1)
    sent, got, damaged = flows.result()
    assert damaged == 0 and sum(got.values()) == sum(sent)

    # podwire status and peers say it: node1 has two lanes, node2 is on lane 0 only.
    text = _cli(n1, "status")
    assert "lanes:       2" in text and f"1: {_lane(n1, 1)}, listen port 51872" in text, text
    table = _cli(n1, "peers").splitlines()  # every peer on lane 0: no LANE column
    assert table[0].split()[:2] == ["NODE", "PUBLIC"], table
    assert [row.split()[0] for row in table[1:]] == ["node2"], table
    assert "lanes:" not in _cli(n2, "status")  # one lane: status as it always was
    secret = n1.key_path.read_text().strip()
    assert secret not in text and secret not in "\n".join(table)


def test_rotating_a_two_lane_node_loses_nothing_on_either_lane(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 2})
    lane1_path = n2.key_path.with_name(f"{n2.key_path.stem}-lane1{n2.key_path.suffix}")
    old = (keys.load(n2.key_path).public_key_b64(), keys.load(lane1_path).public_key_b64())
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    try:
        flows = [
            Flows(cluster, n1.pods[0], n2.pods[0], rate=100, seconds=8),
            Flows(cluster, n2.pods[1], n1.pods[1], rate=100, seconds=8),
        ]
        time.sleep(2)
        cli = subprocess.run(
            [PODWIRE, "rotate-key", "--node", "node2", "--kubeconfig", str(cluster.cp.kubeconfig)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert cli.returncode == 0, cli.stderr
        results = [f.result() for f in flows]
    finally:
        netns_mod.stop_process(clear)
    new = (keys.load(n2.key_path).public_key_b64(), keys.load(lane1_path).public_key_b64())
    assert new[0] != old[0] and new[1] != old[1], "both lanes' keys are new"
    spec = _wgnode(cluster, "node2")["spec"]
    assert (spec["publicKey"], spec["lanes"][0]["publicKey"]) == new
    assert {k for k, _ in _peers(n1, _lane(n1, 0))} == {new[0]}
    assert {k for k, _ in _peers(n1, _lane(n1, 1))} == {new[1]}
    for direction, (sent, got, damaged) in zip(("1->2", "2->1"), results, strict=True):
        lost = sum(sent) - sum(got.values())
        print(f"\nrotation of a 2-lane node, {direction}: {lost} of {sum(sent)} datagrams lost")
        assert damaged == 0
        assert lost == 0, f"{direction}: {lost} of {sum(sent)} lost across the rotation: {got}"
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)


CHART = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "helm" / "podwire"


def _template(*values: str) -> subprocess.CompletedProcess[str]:
    sets = [a for v in ("agent.clusterPodCIDRs=10.244.0.0/16", *values) for a in ("--set", v)]
    return subprocess.run(
        [tools.path("helm"), "template", "t", str(CHART), *sets],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_chart_sets_lanes_and_refuses_what_cannot_run() -> None:
    default = _template()
    assert default.returncode == 0, default.stderr
    assert '{name: PODWIRE_LANES, value: "1"}' in default.stdout
    assert "wireguard-1" not in default.stdout
    three = _template("agent.lanes=3")
    assert three.returncode == 0, three.stderr
    assert '{name: PODWIRE_LANES, value: "3"}' in three.stdout
    for lane in (1, 2):  # each lane's port declared beside lane 0's
        port = f"{{name: wireguard-{lane}, containerPort: {51871 + lane}, protocol: UDP}}"
        assert port in three.stdout
    external = _template("agent.lanes=2", "agent.datapath=userspace")
    assert external.returncode == 0, external.stderr
    assert '"podwire_wg0_1"' in external.stdout  # lane 1's engine container
    own_engines = _template("agent.lanes=2", "agent.datapath=userspace", "engine.enabled=false")
    assert own_engines.returncode == 0, own_engines.stderr
    for bad in ("agent.lanes=0", "agent.lanes=9"):
        refused = _template(bad)
        assert refused.returncode != 0 and "/agent/lanes" in refused.stderr


def _engine_pid(node: topology.Node, device: str) -> int | None:
    """The PID of the engine serving `device` in the node's namespace (the agent started it)."""
    for pid in netns_mod.pids(node.ns.name):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"podwire-engine") for a in argv[:2]) and device.encode() in argv:
            return pid
    return None


def test_a_lane_engine_that_dies_fails_closed_and_comes_back(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 2})
    src, dst = n1.pods[0], n2.pods[0]
    pid = _engine_pid(n1, _lane(n1, 1))
    assert pid is not None, "lane 1 has an engine of its own"
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)  # lane 1's engine dies: its device and route go with it
        netns_mod.wait_until(
            lambda: not n1.ns.link_exists(_lane(n1, 1)) or _engine_pid(n1, _lane(n1, 1)) != pid,
            timeout=10,
            what="lane 1's device gone",
        )
        # Meanwhile: nothing in clear (the flows meet the backstop, or lane 0).
        Flows(cluster, src, dst, rate=50, seconds=1).result()
        # The watchdog brings the lane back; the next pass puts its peer and route back.
        netns_mod.wait_until(
            lambda: (
                len(_peers(n1, _lane(n1, 1))) == 1
                and f"nexthop dev {_lane(n1, 1)}" in _route(n1, n2.pod_cidr)
            ),
            timeout=30,
            what="lane 1 back with its peer and route",
        )
        sent, got, damaged = Flows(cluster, src, dst, rate=50, seconds=2).result()
    finally:
        netns_mod.stop_process(clear)
    assert damaged == 0
    assert {int(p): n for p, n in got.items()} == {40000 + k: n for k, n in enumerate(sent)}
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)
