"""Inside the VM: two lanes on the kernel datapath, both ends kernel WireGuard.

Run by tests/kernel/test_lanes.py through the VM's command server; prints one JSON line of what
it saw. Each side is built as `podwire-agent` builds it with lanes: 2 (select.open_backend for
lane 0, select.open_lane for lane 1, Routes over both devices, the layer-4 multipath hash), and
programmed with plans from reconcile (lane_peers, desired_paths, plan_paths).

ns a                                              ns b
lo 10.244.1.1/32 ("the pod")                      lo 10.244.2.1/32
wa, wa_1 (kernel wg) ===== lane 0: 51820 ======== wb, wb_1
route 10.244.2.0/24 nexthop dev wa                route 10.244.1.0/24 nexthop dev wb
                    nexthop dev wa_1  == lane 1: 51821 ==      nexthop dev wb_1
veth 192.0.2.1/24 ------------------------------- veth 192.0.2.2/24

FLOWS UDP flows from a's pod address to b's, on source ports 40000.., are sent and counted on
b per source port; tcpdump on a's veth sees the UDP port pairs (and, with a filter on the pod
range, anything in clear), tcpdump on b's lane devices which flow came on which lane. Then lane
1's device on a is deleted and the flows are sent again: they must arrive over lane 0 or not at
all (the kernel takes a multipath route away with any of its devices, so the backstop refuses
them), and nothing may leave in clear; then the lane is brought back as the agent would, and
every flow arrives again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

from pyroute2 import config as pr_config

from podwire.agent import config, keys, reconcile, wgdevice
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.datapath import select
from podwire.agent.netlink import links, multipath
from podwire.sandbox import netns as netns_mod

pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

PORT = 51820
DST_PORT = 9000
FLOWS = 8
CLUSTER = "10.244.0.0/16"
POD = {"a": "10.244.1.1", "b": "10.244.2.1"}
CIDR = {"a": "10.244.1.0/24", "b": "10.244.2.0/24"}
UNDERLAY = {"a": "192.0.2.1", "b": "192.0.2.2"}

SENDER = """
import socket, sys, time
src, dst, flows, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
socks = []
for k in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 40000 + k))
    socks.append(s)
for n in range(rounds):
    for k, s in enumerate(socks):
        try:
            s.sendto(f"{k}:{n}:".encode() + bytes(200), (dst, DST_PORT))
        except OSError:
            pass  # unreachable: fail-closed refused it
    time.sleep(0.02)
""".replace("DST_PORT", str(DST_PORT))

RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], DST_PORT))
s.settimeout(30)  # the sender's start may be slow; after its first datagram, the idle limit
got = {}
print("listening", flush=True)
try:
    while True:
        data, (_, sport) = s.recvfrom(2048)
        s.settimeout(float(sys.argv[2]))
        got[str(sport)] = got.get(str(sport), 0) + 1
except TimeoutError:
    pass
print(json.dumps(got), flush=True)
""".replace("DST_PORT", str(DST_PORT))


class Side:
    """One node: its config, its lanes' backends and its routes, as the agent builds them."""

    def __init__(self, name: str, ns: netns_mod.Netns, device: str) -> None:
        env = {"NODE_NAME": name, "PODWIRE_DATAPATH": "kernel", "PODWIRE_DEVICE": device,
               "PODWIRE_CLUSTER_POD_CIDRS": CLUSTER, "PODWIRE_LISTEN_PORT": str(PORT),
               "PODWIRE_LANES": "2"}  # fmt: skip
        self.name, self.ns = name, ns
        self.cfg = config.load(environ=env)
        self.keys = [keys.PrivateKey.generate() for _ in range(self.cfg.lanes)]
        self.backends = [select.open_backend(self.cfg, netns=ns.name)]
        self.backends.append(select.open_lane(self.cfg, 1, datapath="kernel", netns=ns.name))
        self.devices = [self.cfg.lane_device(i) for i in range(self.cfg.lanes)]
        self.routes = routes_mod.Routes(
            self.cfg.device, netns=ns.name, strict=False, devices=self.devices
        )
        self.routes.install_fail_closed(self.cfg.cluster_pod_cidrs)
        for lane, backend in enumerate(self.backends):
            backend.ensure_device()
            backend.set_private_key(self.keys[lane].raw)
            backend.set_listen_port(self.cfg.lane_port(lane))
        self.hash_before = multipath.hash_by_flow(netns=ns.name)
        ns.ip("addr", "add", f"{POD[name]}/32", "dev", "lo")
        ns.ip("link", "set", "lo", "up")

    def as_peer(self) -> reconcile.DesiredPeer:
        host = UNDERLAY[self.name]
        return reconcile.DesiredPeer(
            self.name,
            self.keys[0].public_key_b64(),
            wgdevice.Endpoint(host, PORT),
            (ipaddress.ip_network(CIDR[self.name]),),
            lanes=tuple(
                reconcile.PeerLane(k.public_key_b64(), wgdevice.Endpoint(host, PORT + i))
                for i, k in enumerate(self.keys[1:], start=1)
            ),
        )

    def program(self, peers: list[reconcile.DesiredPeer]) -> None:
        """One reconcile pass, as the agent's reconciler makes it with lanes."""
        for lane, backend in enumerate(self.backends):
            want = reconcile.lane_peers(peers, lane)
            plan = reconcile.plan_peers(want, backend.read().peers, synced=True)
            backend.apply(reconcile.plan_changes(plan))
        paths = reconcile.desired_paths(peers, self.cfg.lanes)
        self.routes.apply_paths(reconcile.plan_paths(paths, self.routes.list_paths(), synced=True))


def _capture(ns: netns_mod.Netns, iface: str, expr: str, pcap: pathlib.Path) -> subprocess.Popen:
    log = pcap.with_suffix(".log")
    proc = subprocess.Popen(
        ns.exec_args(["tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap), expr]),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    netns_mod.wait_until(lambda: "listening on" in log.read_text(), timeout=60, what="tcpdump")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read(pcap: pathlib.Path) -> list[str]:
    out = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    return out.stdout.splitlines()


def _sports(lines: list[str]) -> list[int]:
    return sorted({int(line.split(" > ")[0].rsplit(".", 1)[1]) for line in lines if " > " in line})


def _pairs(lines: list[str]) -> list[list[int]]:
    pairs = set()
    for line in lines:
        a, b = line.split(" IP ", 1)[1].split(": ", 1)[0].split(" > ")
        pairs.add(tuple(sorted((int(a.rsplit(".", 1)[1]), int(b.rsplit(".", 1)[1])))))
    return sorted(list(p) for p in pairs)


def _route_device(ns: netns_mod.Netns, sport: int) -> str:
    got = ns.ip(
        "route", "get", POD["b"], "from", POD["a"], "ipproto", "udp",
        "sport", str(sport), "dport", str(DST_PORT), check=False,
    ).stdout  # fmt: skip
    return got.split(" dev ", 1)[1].split()[0] if " dev " in got else "none"


def _flows(a: Side, b: Side, rounds: int) -> dict[str, int]:
    receiver = subprocess.Popen(
        b.ns.exec_args([sys.executable, "-c", RECEIVER, POD["b"], "3"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "listening"
    a.ns.run(sys.executable, "-c", SENDER, POD["a"], POD["b"], str(FLOWS), str(rounds))
    out, _ = receiver.communicate(timeout=120)
    return json.loads(out)


def main() -> dict:
    facts: dict = {}
    tmp = pathlib.Path(tempfile.mkdtemp())
    with netns_mod.factory("pwl") as f:
        na, nb = f.namespace("a"), f.namespace("b")
        f.veth(na, nb, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24", mtu=1400)
        na.ip("route", "add", "default", "via", UNDERLAY["b"])  # the underlay's way out
        nb.ip("route", "add", "default", "via", UNDERLAY["a"])
        a, b = Side("a", na, f.unique("w")), Side("b", nb, f.unique("w"))
        facts["devices"] = a.devices
        facts["backends"] = [type(x).__name__ for x in a.backends]
        facts["link_kinds"] = [
            json.loads(na.ip("-d", "-j", "link", "show", "dev", d).stdout)[0]
            .get("linkinfo", {})
            .get("info_kind")
            for d in a.devices
        ]
        facts["hash_policy"] = multipath.read(netns=na.name)
        a.program([b.as_peer()])
        b.program([a.as_peer()])
        facts["route"] = na.ip("route", "show", CIDR["b"]).stdout
        facts["paths"] = {str(k): list(v) for k, v in a.routes.list_paths().items()}
        facts["peers_by_lane"] = [
            [(p.public_key, str(p.endpoint)) for p in x.read().peers] for x in a.backends
        ]
        facts["b_keys"] = [k.public_key_b64() for k in b.keys]
        ping = na.run(
            "ping", "-n", "-q", "-c", "3", "-I", POD["a"], "-w", "60", POD["b"], check=False
        )
        facts["ping"] = ping.returncode == 0  # the first packets wait for the handshake

        veth = next(
            link["ifname"]
            for link in json.loads(na.ip("-j", "link", "show").stdout)
            if link.get("link_type") == "ether"
        )
        wire = _capture(na, veth, "udp and portrange 51820-51821", tmp / "wire.pcap")
        clear = _capture(na, veth, "net 10.244.0.0/16", tmp / "clear.pcap")
        inside = [
            _capture(nb, d, f"udp dst port {DST_PORT}", tmp / f"lane{i}.pcap")
            for i, d in enumerate(b.devices)
        ]
        try:
            facts["got"] = _flows(a, b, rounds=20)
        finally:
            for proc in (wire, *inside):
                _stop(proc)
        facts["pairs"] = _pairs(_read(tmp / "wire.pcap"))
        facts["flows_by_lane"] = [_sports(_read(tmp / f"lane{i}.pcap")) for i in range(2)]

        # Lane 1's device on a goes (deleted by hand, a crash of the module, ...): its flows
        # must fail closed, over lane 0 or dropped, never in clear.
        links.delete_link(a.devices[1], netns=na.name)
        facts["route_after_removal"] = na.ip("route", "show", CIDR["b"]).stdout
        facts["got_after_removal"] = _flows(a, b, rounds=20)
        # What the kernel does with each flow now: the device of its route.
        facts["lookups_after_removal"] = sorted(
            {_route_device(na, 40000 + k) for k in range(FLOWS)}
        )
        facts["unreachable_after_removal"] = na.ip("route", "show", "type", "unreachable").stdout
        # What the agent's watchdog and next pass do: the lane's device made again with its key
        # and port, its peer and the multipath route put back; every flow arrives again.
        lane1 = select.open_lane(a.cfg, 1, datapath="kernel", netns=na.name)
        lane1.ensure_device()
        lane1.set_private_key(a.keys[1].raw)
        lane1.set_listen_port(a.cfg.lane_port(1))
        a.backends[1] = lane1
        a.program([b.as_peer()])
        facts["paths_restored"] = {str(k): list(v) for k, v in a.routes.list_paths().items()}
        try:
            facts["got_restored"] = _flows(a, b, rounds=20)
        finally:
            _stop(clear)
        facts["clear"] = _read(tmp / "clear.pcap")[:20]
        multipath.restore(a.hash_before, netns=na.name)
        multipath.restore(b.hash_before, netns=nb.name)
        facts["hash_after_restore"] = multipath.read(netns=na.name)
        facts["hash_before"] = a.hash_before
    return facts


if __name__ == "__main__":
    print(json.dumps(main()))
