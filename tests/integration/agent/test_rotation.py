"""Key rotation as a cluster operator meets it: three agents on the userspace datapath, real
podwire-engine devices in node namespaces, the real apiserver, the `podwire` CLI.

What is measured is printed (packets lost, the longest gap) for the closing notes; what is
asserted is what a user would notice: no lost ping at 100 a second, no stall of a TCP stream
over 200 ms, nothing in clear on the underlay, and after a crash at any step one key on the
node, on its device and in its WireguardNode.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from underlay import capture_underlay

from podwire.agent import failpoint, keys
from podwire.api import wgnode
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import operatorproc, tools, topology

PODWIRE = str(pathlib.Path(sys.executable).with_name("podwire"))


def _wgnode(cluster: topology.Cluster, name: str) -> dict:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _settled(cluster: topology.Cluster, names: list[str]) -> bool:
    """Every agent Ready and holding every other node as a peer."""
    for name in names:
        status = _wgnode(cluster, name).get("status", {})
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )
        if not ready or status.get("peers") != len(names) - 1:
            return False
    return True


@pytest.fixture
def three(cluster: topology.Cluster) -> topology.Cluster:
    names = ["node1", "node2", "node3"]
    for name in names:
        cluster.start_agent(cluster.add_node(name))
    netns_mod.wait_until(lambda: _settled(cluster, names), timeout=60, what="three agents")
    return cluster


class Ping:
    """A ping at 100 packets a second from one pod to another, for `seconds`."""

    def __init__(self, src: topology.Pod, dst: topology.Pod, *, seconds: float) -> None:
        count = int(seconds * 100)
        self.what = f"{src.name} -> {dst.name}"
        self.proc = subprocess.Popen(
            src.ns.exec_args(["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", dst.ip]),
            stdout=subprocess.PIPE,
            text=True,
        )

    def result(self) -> tuple[int, int, float]:
        """Packets sent, packets lost, and the longest round trip in ms."""
        try:
            out, _ = self.proc.communicate(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert summary, out[-500:]
        sent, received = int(summary.group(1)), int(summary.group(2))
        rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out)
        return sent, sent - received, float(rtt.group(1)) if rtt else float("inf")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Stream:
    """An iperf3 TCP stream between two pods, reported every 100 ms."""

    def __init__(
        self, cluster: topology.Cluster, src: topology.Pod, dst: topology.Pod, *, seconds: int
    ) -> None:
        iperf = tools.path("iperf3")
        self.server = cluster.factory.spawn(dst.ns, [iperf, "-s", "-1", "-B", dst.ip])
        time.sleep(0.5)
        self.client = subprocess.Popen(
            src.ns.exec_args(
                [iperf, "-c", dst.ip, "-t", str(seconds), "-i", "0.1", "-J", "--connect-timeout", "5000"]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def longest_gap(self) -> tuple[float, float]:
        """The longest run of 100 ms intervals that moved nothing (seconds), and the mean rate
        in Mbit/s."""
        try:
            out, _ = self.client.communicate(timeout=120)
        finally:
            self.stop()
        report = json.loads(out)
        assert "error" not in report, report.get("error")
        longest = run = 0.0
        for interval in report["intervals"]:
            s = interval["sum"]
            if s["bytes"] == 0:
                run += s["seconds"]
                longest = max(longest, run)
            else:
                run = 0.0
        mbits = report["end"]["sum_received"]["bits_per_second"] / 1e6
        return longest, mbits

    def stop(self) -> None:
        if self.client.poll() is None:
            self.client.kill()
            self.client.wait()


@pytest.fixture
def traffic() -> Iterator[list[Ping | Stream]]:
    started: list[Ping | Stream] = []
    yield started
    for t in started:
        t.stop()


def _device_key(node: topology.Node) -> str:
    return node.ns.run("wg", "show", node.device, "public-key").stdout.strip()


def _peer_keys(node: topology.Node) -> set[str]:
    return set(node.ns.run("wg", "show", node.device, "peers").stdout.split())


def _consistent(cluster: topology.Cluster, node: topology.Node) -> str | None:
    """The node's one key when file, device and WireguardNode agree, the rotation is complete
    and every other node programs it; else None."""
    stored = keys.load(node.key_path).public_key_b64()
    if keys.load_previous(node.key_path) is not None:
        return None
    if _device_key(node) != stored:
        return None
    if _wgnode(cluster, node.name).get("spec", {}).get("publicKey") != stored:
        return None
    others = [n for n in cluster.nodes.values() if n is not node]
    return stored if all(stored in _peer_keys(n) for n in others) else None


def test_rotate_key_from_the_cli_loses_no_packet(
    three: topology.Cluster, traffic: list[Ping | Stream], tmp_path: pathlib.Path
) -> None:
    n1, n2, n3 = (three.nodes[f"node{i}"] for i in (1, 2, 3))
    old = keys.load(n2.key_path).public_key_b64()
    capture, pcap = capture_underlay(three, tmp_path)
    pings = [
        Ping(n1.pods[0], n2.pods[0], seconds=10),
        Ping(n2.pods[0], n3.pods[0], seconds=10),
    ]
    stream = Stream(three, n1.pods[1], n2.pods[1], seconds=9)
    traffic.extend([*pings, stream])
    time.sleep(3)
    started = time.time()
    cli = subprocess.run(
        [PODWIRE, "rotate-key", "--node", "node2", "--kubeconfig", str(three.cp.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert cli.returncode == 0, cli.stderr
    new = keys.load(n2.key_path).public_key_b64()
    assert new != old and new in cli.stdout
    results = [p.result() for p in pings]
    gap, mbits = stream.longest_gap()
    netns_mod.stop_process(capture)
    print(
        f"\nrotation from the CLI: {', '.join(f'{p.what}: {r[1]} of {r[0]} lost, max rtt {r[2]:.1f} ms' for p, r in zip(pings, results, strict=True))}; "
        f"iperf3 {mbits:.0f} Mbit/s, longest gap {gap * 1000:.0f} ms"
    )  # fmt: skip
    for p, (sent, lost, _) in zip(pings, results, strict=True):
        assert lost == 0, f"{p.what}: {lost} of {sent} pings lost across the rotation"
    assert gap < 0.2, f"the TCP stream stalled {gap * 1000:.0f} ms"
    leaked = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    assert leaked.stdout.strip() == "", f"pod traffic in clear on the underlay:\n{leaked.stdout}"

    # What the operator sees: the new key everywhere, its age, every peer on it.
    assert _consistent(three, n2) == new
    listing = three.cp.kubectl("get", "wgnodes").stdout
    assert "KEY AGE" in listing.splitlines()[0]
    status = _wgnode(three, "node2")["status"]
    assert wgnode.parse_time(status["keyRotatedAt"]) >= int(started)
    netns_mod.wait_until(
        lambda: _wgnode(three, "node2")["status"].get("peersOnCurrentKey") == 2,
        timeout=30,
        what="both peers to handshake with node2's new key",
    )
    events = three.cp.kubectl(
        "get", "events", "-A", "--field-selector", "reason=KeyRotated", "-o", "json"
    ).stdout
    assert any(e["involvedObject"].get("name") == "node2" for e in json.loads(events)["items"]), (
        "an Event on node2's WireguardNode says it rotated"
    )


@pytest.mark.parametrize("step", ["stored", "applied", "published"])
def test_an_agent_killed_mid_rotation_recovers_to_one_key(
    three: topology.Cluster, traffic: list[Ping | Stream], step: str
) -> None:
    n1, n2 = three.nodes["node1"], three.nodes["node2"]
    old = keys.load(n2.key_path).public_key_b64()
    three.stop_agent(n2)
    three.start_agent(n2, env={failpoint.ENV: f"rotation-{step}"})
    netns_mod.wait_until(
        lambda: _settled(three, ["node1", "node2", "node3"]), timeout=60, what="node2 back"
    )
    ping = Ping(n1.pods[0], n2.pods[0], seconds=20)
    traffic.append(ping)
    requested = wgnode.format_precise_time(time.time())
    three.cp.kubectl(
        "annotate", "--overwrite", "wgnode", "node2", f"{wgnode.ROTATE_ANNOTATION}={requested}"
    )
    log = n2.workdir / "agent.log"
    netns_mod.wait_until(
        lambda: f"failpoint rotation-{step} reached" in log.read_text(),
        timeout=30,
        what=f"node2's agent to die after the new key was {step}",
    )
    three.stop_agent(n2)  # reaps what is left of it
    three.start_agent(n2)
    netns_mod.wait_until(
        lambda: _consistent(three, n2),
        timeout=60,
        what="one key on node2, its device and its WireguardNode",
    )
    assert _consistent(three, n2) != old
    sent, lost, _ = ping.result()
    print(f"\nkilled after the key was {step}: {lost} of {sent} pings lost")
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=3, timeout=10), "traffic flows again"


@pytest.fixture
def operator(three: topology.Cluster, tmp_path: pathlib.Path) -> Iterator[Callable[..., None]]:
    """Starts one podwire-operator against the cluster, in a namespace of its own (its Lease),
    with the flags given; stopped and its namespace deleted at the end."""
    namespace = f"pw-op-{tmp_path.name[-12:].lower().replace('_', '-')}"
    three.cp.kubectl("create", "namespace", namespace)

    def start(*flags: str) -> None:
        operatorproc.start(
            three.record,
            kubeconfig=three.cp.kubeconfig,
            workdir=tmp_path,
            replicas=1,
            namespace=namespace,
            flags=("--resync=1s", *flags),
        )

    try:
        yield start
    finally:
        operatorproc.stop(three.record)
        three.cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _rotated_at(cluster: topology.Cluster, name: str) -> float:
    text = _wgnode(cluster, name).get("status", {}).get("keyRotatedAt")
    return wgnode.parse_time(text) if text else 0.0


def _kube_events(cluster: topology.Cluster, reason: str) -> list[str]:
    out = cluster.cp.kubectl(
        "get", "events", "-A", "--field-selector", f"reason={reason}", "-o", "json"
    ).stdout
    return [e["involvedObject"].get("name", "") for e in json.loads(out)["items"]]


def test_a_scheduled_rotation_goes_one_node_at_a_time_and_loses_no_packet(
    three: topology.Cluster,
    operator: Callable[..., None],
    traffic: list[Ping | Stream],
    tmp_path: pathlib.Path,
) -> None:
    names = ["node1", "node2", "node3"]
    n1, n2, n3 = (three.nodes[n] for n in names)
    before = {n: keys.load(three.nodes[n].key_path).public_key_b64() for n in names}
    capture, pcap = capture_underlay(three, tmp_path)
    pings = [
        Ping(n1.pods[0], n2.pods[0], seconds=25),
        Ping(n2.pods[0], n3.pods[0], seconds=25),
        Ping(n3.pods[1], n1.pods[1], seconds=25),
    ]
    traffic.extend(pings)
    # The keys were made as the agents started: with a 10 s interval all three fall due
    # within seconds, and one round (a second or two) ends long before the next is due.
    operator("--key-rotation-interval=10s", "--rotation-deadline=30s")
    netns_mod.wait_until(
        lambda: (
            all(keys.load(three.nodes[n].key_path).public_key_b64() != before[n] for n in names)
            and all(_consistent(three, three.nodes[n]) for n in names)
        ),
        timeout=40,
        what="every node rotated once",
    )
    operatorproc.stop(three.record)  # no second round while the pings run on
    results = [p.result() for p in pings]
    netns_mod.stop_process(capture)
    print(
        "\nscheduled rotation of three nodes: "
        + "; ".join(f"{p.what}: {r[1]} of {r[0]} lost, max rtt {r[2]:.1f} ms" for p, r in zip(pings, results, strict=True))
    )  # fmt: skip
    for p, (sent, lost, _) in zip(pings, results, strict=True):
        assert lost == 0, f"{p.what}: {lost} of {sent} pings lost across the rotations"
    leaked = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    assert leaked.stdout.strip() == "", f"pod traffic in clear on the underlay:\n{leaked.stdout}"
    # One at a time: each node was asked only once the one before had finished.
    order = sorted(names, key=lambda n: _rotated_at(three, n))
    requested = {
        n: wgnode.parse_time(_wgnode(three, n)["metadata"]["annotations"][wgnode.ROTATE_ANNOTATION])
        for n in names
    }
    for earlier, later in itertools.pairwise(order):
        assert requested[later] >= _rotated_at(three, earlier), (
            f"{later} was asked at {requested[later]} before {earlier} finished"
        )
    assert set(names) <= set(_kube_events(three, "KeyRotated")), "an Event on each node"


def test_a_node_whose_agent_is_stopped_is_reported_and_the_rotation_goes_on(
    three: topology.Cluster, operator: Callable[..., None]
) -> None:
    n1, n2, n3 = (three.nodes[f"node{i}"] for i in (1, 2, 3))
    key3 = keys.load(n3.key_path).public_key_b64()
    three.stop_agent(n3)  # its engine keeps forwarding; nobody answers for the node
    ping = Ping(n1.pods[0], n2.pods[0], seconds=45)
    operator("--rotation-deadline=8s")
    cli = subprocess.run(
        [PODWIRE, "rotate-key", "--all", "--kubeconfig", str(three.cp.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and "queued 3 nodes" in cli.stdout, cli.stdout + cli.stderr

    def everyone_had_a_turn() -> bool:
        objs = [_wgnode(three, f"node{i}") for i in (1, 2, 3)]
        return not any(
            wgnode.ROTATION_QUEUED_ANNOTATION in (o["metadata"].get("annotations") or {})
            for o in objs
        )

    netns_mod.wait_until(everyone_had_a_turn, timeout=90, what="the queue to empty")
    assert "node3" in _kube_events(three, "KeyRotationTimedOut"), "node3 reported"
    conditions = {c["type"]: c for c in _wgnode(three, "node3")["status"].get("conditions", [])}
    assert conditions["KeyRotation"]["status"] == "False"
    assert conditions["KeyRotation"]["reason"] == "Deadline"
    assert keys.load(n3.key_path).public_key_b64() == key3, "node3 never half-rotated"
    # node1 and node2 rotated, and traffic between them never stopped.
    for node in (n1, n2):
        assert (
            _wgnode(three, node.name)["spec"]["publicKey"]
            == keys.load(node.key_path).public_key_b64()
        )
    sent, lost, _ = ping.result()
    print(f"\nrolling rotation with node3's agent stopped: node1 -> node2 {lost} of {sent} lost")
    assert lost == 0
    # node3's agent back: it learns the new keys and everyone is consistent again.
    three.start_agent(n3)
    netns_mod.wait_until(
        lambda: all(_consistent(three, n) for n in (n1, n2, n3)),
        timeout=60,
        what="node3 to follow the new keys",
    )
    assert n3.pods[0].ns.ping(n1.pods[0].ip, count=3, timeout=10)
