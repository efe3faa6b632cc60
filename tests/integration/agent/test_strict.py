"""strictMode on a running agent, seen from outside: captures on the underlay and in the pods.

node1 runs with strictMode (the default), node2 without (the control: what strictMode stops is
seen there), node3 is a Node with no agent, whose pods send in clear: the spoofer.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology

STRICT_OFF = {"PODWIRE_STRICT_MODE": "false"}


def _condition(cluster: topology.Cluster, name: str, kind: str) -> str | None:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    obj = json.loads(out.stdout) if out.returncode == 0 else {}
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return f"{c['status']}/{c['reason']}"
    return None


def _wait_ready(cluster: topology.Cluster, *names: str) -> None:
    netns_mod.wait_until(
        lambda: all((_condition(cluster, n, "Ready") or "").startswith("True") for n in names),
        timeout=120,
        what=f"{', '.join(names)} Ready",
    )


def _capture(
    factory: netns_mod.NetnsFactory, ns: netns_mod.Netns, dev: str, path: pathlib.Path, flt: str
) -> object:
    log = path.with_suffix(".log")
    proc = factory.spawn(ns, ["tcpdump", "-i", dev, "-n", "-U", "-w", str(path), flt], log_path=log)
    netns_mod.wait_until(
        lambda: "listening on" in log.read_text(), timeout=20, what="tcpdump to listen"
    )
    return proc


def _read(path: pathlib.Path) -> list[str]:
    out = subprocess.run(["tcpdump", "-r", str(path), "-n"], capture_output=True, text=True)
    return out.stdout.splitlines()


def _pod_dev(pod: topology.Pod) -> str:
    return str(json.loads(pod.ns.ip("-j", "link", "show", "type", "veth").stdout)[0]["ifname"])


def test_spoofed_pod_traffic_in_clear_never_reaches_a_local_pod(
    cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    n1, n2, n3 = (cluster.add_node(f"node{i}") for i in (1, 2, 3))
    cluster.start_agent(n1)
    cluster.start_agent(n2, env=STRICT_OFF)
    _wait_ready(cluster, "node1", "node2")
    # node3 has no agent: its pods reach the others' pods in clear over the underlay.
    for target in (n1, n2):
        n3.ns.ip("route", "add", target.pod_cidr, "via", target.underlay_ip)
    caps = {
        n.name: _capture(
            cluster.factory, n.pods[0].ns, _pod_dev(n.pods[0]), tmp_path / f"{n.name}.pcap", "icmp"
        )
        for n in (n1, n2)
    }
    try:
        for target in (n1, n2):
            n3.pods[0].ns.ping(target.pods[0].ip, count=3, timeout=2, interval=0.2)
    finally:
        for proc in caps.values():
            netns_mod.stop_process(proc)  # type: ignore[arg-type]
    spoofed = n3.pods[0].ip
    control = [line for line in _read(tmp_path / "node2.pcap") if f"{spoofed} >" in line]
    strict = [line for line in _read(tmp_path / "node1.pcap") if f"{spoofed} >" in line]
    assert control, "node2 (strictMode off) saw nothing: the capture proves nothing"
    assert not strict, "node1 delivered pod traffic that came in clear:\n" + "\n".join(strict)


def test_a_competing_route_does_not_take_pod_traffic_and_removed_rules_come_back(
    cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    n1, n2, n3 = (cluster.add_node(f"node{i}") for i in (1, 2, 3))
    cluster.start_agent(n1, env={"PODWIRE_RESYNC_PERIOD": "3"})
    cluster.start_agent(n2, env={"PODWIRE_RESYNC_PERIOD": "3"})
    _wait_ready(cluster, "node1", "node2")
    # Another program's more specific route to node2's pod, out of the underlay in clear.
    n1.ns.ip("route", "add", f"{n2.pods[0].ip}/32", "via", n3.underlay_ip)
    pcap = tmp_path / "underlay.pcap"
    cap = _capture(cluster.factory, cluster.underlay, cluster.bridge, pcap, "net 10.244.0.0/16")
    try:
        assert n1.pods[0].ns.ping(n2.pods[0].ip, count=3, timeout=10, interval=0.2)
    finally:
        netns_mod.stop_process(cap)  # type: ignore[arg-type]
    clear = [line for line in _read(pcap) if n1.pods[0].ip in line]
    assert not clear, "pod traffic left node1 in clear:\n" + "\n".join(clear)
    netns_mod.wait_until(
        lambda: _condition(cluster, "node1", "Encrypted") == "True/CompetingRouteOverridden",
        timeout=60,
        what="the competing route reported in the Encrypted condition",
    )

    # Rule and backstop removed by hand: a later pass puts them back.
    n1.ns.ip("rule", "del", "priority", "5210", "to", "10.244.0.0/16")
    n1.ns.ip("route", "del", "unreachable", "10.244.0.0/16")
    netns_mod.wait_until(
        lambda: (
            "lookup" in n1.ns.ip("rule", "show", "priority", "5210").stdout
            and "10.244.0.0/16" in n1.ns.ip("route", "show", "type", "unreachable").stdout
        ),
        timeout=60,
        what="node1's agent to put its rule and backstop back",
    )
    # The Event is posted just after the repair: wait for it rather than race it.
    netns_mod.wait_until(
        lambda: "RoutingRestored" in cluster.cp.kubectl("get", "events", "-A").stdout,
        timeout=30,
        what="a RoutingRestored Event",
    )
