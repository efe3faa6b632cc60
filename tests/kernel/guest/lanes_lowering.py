"""Inside the VM: lanes lowered from 2 to 1 at a restart, on the kernel datapath, both nodes agents.

Run by tests/kernel/test_lanes_lowering.py through the VM's command server; prints one JSON line
of what it saw. Each node's agent is `podwire-agent` as `app.assemble` builds it, with its real
kernel datapath (lanes: 2, fail-closed), its process in its node's network namespace for each
of its calls (setns, back home after). No apiserver runs in the VM: the cluster is one
tests/support/agentfakes.py FakeApi both agents write to, and an agent "sees" the cluster when
its watches list the FakeApi's objects and its control loop turns (`sync`), so the test says
when node b reads node a's WireguardNode.

ns a (node-a's agent)                                ns b (node-b's agent)
lo 10.244.1.1/32 ("the pod")                         lo 10.244.2.1/32
podwire_wg0   (kernel wg, 51820) ==== lane 0 ======= podwire_wg0   (51820)
podwire_wg0_1 (kernel wg, 51821) ==== lane 1 ======= podwire_wg0_1 (51821)
route 10.244.2.0/24 multipath over both              route 10.244.1.0/24 multipath over both
veth 192.0.2.1/24 ---------------------------------- veth 192.0.2.2/24

1. Both agents with two lanes: 8 UDP flows each way arrive whole, over both lanes' port pairs.
2. a's agent stops and a new one starts with lanes: 1, while flows run both ways and a's route
   to b's pods is looked at in a loop: a's lane 1 device, its key file and its nexthops go, the
   multipath hash is put back; b has not read a's WireguardNode yet (what b still sends over
   its lane 1 is dropped, encrypted, at a).
3. b reads it (its peer on lane 1 goes, its route to a's pods is single-path over lane 0), and
   8 UDP flows each way arrive whole, over lane 0's port pair alone.
Throughout, tcpdump on a's underlay looks for pod addresses in clear.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from pyroute2 import config as pr_config

from podwire.agent import app, config, watches
from podwire.agent import clock as clock_mod
from podwire.agent.netlink import multipath
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "support"))
import agentfakes  # the tests' doubles, beside this tier

pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

DEVICE = "podwire_wg0"
PORT = 51820
CLUSTER = "10.244.0.0/16"
NODE = {"a": "node-a", "b": "node-b"}
POD = {"a": "10.244.1.1", "b": "10.244.2.1"}
CIDR = {"a": "10.244.1.0/24", "b": "10.244.2.0/24"}
UNDERLAY = {"a": "192.0.2.1", "b": "192.0.2.2"}
DST_PORT = 9000
FLOWS = 8
RATE = 50  # datagrams a second per flow
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# Sends FLOWS UDP flows (source ports 40000..) from one pod to the other, RATE a second each,
# for `rounds` rounds, or until SIGTERM when rounds is 0; prints per source port what it sent,
# and how many of those the kernel refused (no route but the backstop).
SENDER = """
import json, signal, socket, sys, time
src, dst, flows, rate, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
done = []
signal.signal(signal.SIGTERM, lambda *_: done.append(1))
socks = []
for k in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 40000 + k))
    socks.append(s)
sent = {str(40000 + k): 0 for k in range(flows)}
refused = {str(40000 + k): 0 for k in range(flows)}
n = 0
print("sending", flush=True)
while not done and (rounds == 0 or n < rounds):
    for k, s in enumerate(socks):
        sent[str(40000 + k)] += 1
        try:
            s.sendto(f"{k}:{n}:".encode() + bytes((k + n + i) % 256 for i in range(200)), (dst, DST_PORT))
        except OSError:
            refused[str(40000 + k)] += 1  # unreachable: the fail-closed backstop refused it
    n += 1
    time.sleep(1 / rate)
print(json.dumps({"sent": sent, "refused": refused}), flush=True)
""".replace("DST_PORT", str(DST_PORT))

# Counts what arrives per source port, and what arrives altered; exits IDLE seconds after the
# last datagram (60 before the first).
RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], DST_PORT))
s.settimeout(60)
got, damaged = {}, 0
print("listening", flush=True)
try:
    while True:
        data, (_, sport) = s.recvfrom(2048)
        s.settimeout(float(sys.argv[2]))
        head = data.split(b":", 2)
        k, n = int(head[0]), int(head[1])
        if head[2] != bytes((k + n + i) % 256 for i in range(200)) or sport != 40000 + k:
            damaged += 1
        got[str(sport)] = got.get(str(sport), 0) + 1
except TimeoutError:
    pass
print(json.dumps({"got": got, "damaged": damaged}), flush=True)
""".replace("DST_PORT", str(DST_PORT))


@contextlib.contextmanager
def inside(ns: netns_mod.Netns) -> Iterator[None]:
    """This thread in ns's network namespace (where its node's agent lives), then back home."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fd = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns.name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the guest's namespace")
    finally:
        os.close(fd)
        os.close(home)


class Agent:
    """One run of a node's agent, assembled as `podwire-agent` is, on the cluster's FakeApi;
    every call of it is made from inside its node's namespace."""

    def __init__(
        self, side: str, ns: netns_mod.Netns, api: agentfakes.FakeApi, key_path: pathlib.Path,
        lanes: int,
    ) -> None:  # fmt: skip
        env = {"NODE_NAME": NODE[side], "PODWIRE_DATAPATH": "kernel", "PODWIRE_DEVICE": DEVICE,
               "PODWIRE_CLUSTER_POD_CIDRS": CLUSTER, "PODWIRE_LISTEN_PORT": str(PORT),
               "PODWIRE_LANES": str(lanes), "PODWIRE_KEY_PATH": str(key_path)}  # fmt: skip
        cfg = self.cfg = config.load(environ=env)
        self.side, self.ns, self.api = side, ns, api
        self.wakeup = threading.Event()
        self.nodes = agentfakes.MemorySource("nodes", on_change=self.wakeup.set)
        self.wgnodes = agentfakes.MemorySource("wgnodes", on_change=self.wakeup.set)

        with inside(ns):
            self.app = app.assemble(
                cfg,
                api=api,
                api_error=agentfakes.FakeApiError,
                emit=api.emit_event,
                watched=watches.Watches(self.nodes, self.wgnodes),
                wakeup=self.wakeup,
                **app.node_parts(cfg),
                clock=clock_mod.MonotonicClock(),
            )

    def boot(self) -> None:
        """The agent's start: fail-closed, the keys, the devices (found if they exist), and
        lanes an earlier agent had beyond this one's retired."""
        with inside(self.ns):
            assert self.app.start(threading.Event(), loop=False)

    def sync(self) -> None:
        """The watches list the cluster as it is now, and the control loop turns: peers and
        routes programmed, the own WireguardNode published."""
        with inside(self.ns):
            self.nodes.list([copy.deepcopy(o) for o in self.api.nodes.values()])
            self.wgnodes.list([copy.deepcopy(o) for o in self.api.wgnodes.values()])
            for _ in range(3):
                self.app.controller.step(woke=True)

    def stop(self) -> None:
        """A plain stop (a restart): the devices, routes and hash stay for the next agent."""
        with inside(self.ns):
            self.app.stop()


def _route(ns: netns_mod.Netns, cidr: str) -> str:
    """The route to cidr, in whichever table it is (strictMode: podwire's own)."""
    return ns.ip("route", "show", "table", "all", cidr).stdout.strip()


class Looker:
    """`ip route` in ns, in a loop of its own process, for the route to cidr until `stop`:
    what each look saw."""

    def __init__(self, f: netns_mod.NetnsFactory, ns: netns_mod.Netns, cidr: str,
                 base: pathlib.Path) -> None:  # fmt: skip
        self.stop_file, self.log = base.with_suffix(".stop"), base.with_suffix(".log")
        loop = (f'while [ ! -e {self.stop_file} ]; do ip route show table all {cidr}; '
                'echo "=="; sleep 0.05; done')  # fmt: skip
        self.proc = f.spawn(ns, ["sh", "-c", loop], log_path=self.log)
        netns_mod.wait_until(lambda: "==" in self.log.read_text(), timeout=60, what="a look")

    def stop(self) -> list[str]:
        self.stop_file.touch()
        netns_mod.wait_until(lambda: self.proc.poll() is not None, timeout=60, what="the looks")
        return [look.strip() for look in self.log.read_text().split("==")[:-1]]


def _route_device(ns: netns_mod.Netns, src: str, dst: str, sport: int) -> str:
    """The device the kernel sends a flow from src:sport to dst:DST_PORT through."""
    got = ns.ip(
        "route", "get", dst, "from", src, "ipproto", "udp",
        "sport", str(sport), "dport", str(DST_PORT), check=False,
    ).stdout  # fmt: skip
    return got.split(" dev ", 1)[1].split()[0] if " dev " in got else "none"


def _links(ns: netns_mod.Netns) -> list[str]:
    return sorted(
        f"{link['ifname']} {link.get('linkinfo', {}).get('info_kind', '')}"
        for link in json.loads(ns.ip("-d", "-j", "link", "show").stdout)
        if link["ifname"].startswith(DEVICE)
    )


def _peers(ns: netns_mod.Netns, device: str) -> list[str]:
    """The device's peers: public key and endpoint of each."""
    out = ns.run(tools.path("wg"), "show", device, "endpoints").stdout
    return sorted(line.replace("\t", " ") for line in out.strip().splitlines())


def _public_key(ns: netns_mod.Netns, device: str) -> str:
    return ns.run(tools.path("wg"), "show", device, "public-key").stdout.strip()


def _ping(ns: netns_mod.Netns, src: str, dst: str, *, deadline: int) -> bool:
    """src's pod reaches dst's (the first packets may wait for a handshake under emulation)."""
    argv = ["ping", "-n", "-q", "-c", "3", "-I", POD[src], "-w", str(deadline), POD[dst]]
    return ns.run(*argv, check=False, timeout=deadline + 20).returncode == 0


def _hash(ns: netns_mod.Netns) -> dict[str, int]:
    return multipath.read(netns=ns.name)


class Capture:
    """tcpdump on a device of ns, from start to `lines()`."""

    def __init__(self, f: netns_mod.NetnsFactory, ns: netns_mod.Netns, iface: str, expr: str,
                 pcap: pathlib.Path) -> None:  # fmt: skip
        self.pcap, log = pcap, pcap.with_suffix(".log")
        self.proc = f.spawn(ns, ["tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap), expr],
                            log_path=log)  # fmt: skip
        netns_mod.wait_until(
            lambda: "listening on" in log.read_text() or self.proc.poll() is not None,
            timeout=60,
            what="tcpdump",
        )
        assert self.proc.poll() is None, log.read_text()

    def lines(self) -> list[str]:
        netns_mod.stop_process(self.proc)
        out = subprocess.run(["tcpdump", "-r", str(self.pcap), "-n"], capture_output=True,
                             text=True, check=False)  # fmt: skip
        return out.stdout.splitlines()


def _pairs(lines: list[str]) -> list[list[int]]:
    """The UDP port pairs (lower first) of the captured datagrams."""
    pairs = set()
    for line in lines:
        if " IP " not in line:
            continue
        a, b = line.split(" IP ", 1)[1].split(": ", 1)[0].split(" > ")
        pairs.add(tuple(sorted((int(a.rsplit(".", 1)[1]), int(b.rsplit(".", 1)[1])))))
    return sorted(list(p) for p in pairs)


class Flows:
    """FLOWS UDP flows from src's pod to dst's, counted on arrival; started now, `result()`
    ends them (a sender with rounds 0 runs until then)."""

    def __init__(self, f: netns_mod.NetnsFactory, tmp: pathlib.Path, src: str, dst: str,
                 ns: dict[str, netns_mod.Netns], *, rounds: int, idle: float) -> None:  # fmt: skip
        self.rounds = rounds
        self.name = f"{src}{dst}{f.unique('f')}"
        self.sent_log, self.got_log = tmp / f"{self.name}.sent", tmp / f"{self.name}.got"
        self.receiver = f.spawn(ns[dst], [sys.executable, "-c", RECEIVER, POD[dst], str(idle)],
                                log_path=self.got_log)  # fmt: skip
        netns_mod.wait_until(lambda: "listening" in self.got_log.read_text(), timeout=60,
                             what="the receiver")  # fmt: skip
        self.sender = f.spawn(
            ns[src],
            [sys.executable, "-c", SENDER, POD[src], POD[dst], str(FLOWS), str(RATE), str(rounds)],
            log_path=self.sent_log,
        )
        netns_mod.wait_until(lambda: "sending" in self.sent_log.read_text(), timeout=60,
                             what="the sender")  # fmt: skip

    def result(self) -> dict:
        """What was sent (and refused at the sender) and what arrived, per source port;
        altered datagrams counted."""
        if self.rounds:
            netns_mod.wait_until(lambda: self.sender.poll() is not None, timeout=120,
                                 what="the sender")  # fmt: skip
        else:
            netns_mod.stop_process(self.sender, grace=30)  # SIGTERM: it prints its counts
        netns_mod.wait_until(lambda: self.receiver.poll() is not None, timeout=120,
                             what="the receiver to go idle")  # fmt: skip
        sent = json.loads(self.sent_log.read_text().strip().splitlines()[-1])
        got = json.loads(self.got_log.read_text().strip().splitlines()[-1])
        return {**sent, "got": got["got"], "damaged": got["damaged"]}


def main() -> dict:
    facts: dict = {}
    tmp = pathlib.Path(tempfile.mkdtemp())
    keys = {side: tmp / side / "private.key" for side in "ab"}
    for path in keys.values():
        path.parent.mkdir(mode=0o700)
    api = agentfakes.FakeApi()
    for side in "ab":
        api.nodes[NODE[side]] = agentfakes.node(NODE[side], UNDERLAY[side], [CIDR[side]])
    with netns_mod.factory("pwo") as f:
        ns = {"a": f.namespace("a"), "b": f.namespace("b")}
        veth, _ = f.veth(ns["a"], ns["b"], a_addr=f"{UNDERLAY['a']}/24",
                         b_addr=f"{UNDERLAY['b']}/24", mtu=1400)  # fmt: skip
        for side in "ab":
            ns[side].ip("addr", "add", f"{POD[side]}/32", "dev", "lo")
        na, nb = ns["a"], ns["b"]
        facts["hash_before"] = _hash(na)
        clear = Capture(f, na, veth, f"net {CLUSTER}", tmp / "clear.pcap")

        # 1. Both nodes with two lanes.
        a = Agent("a", na, api, keys["a"], lanes=2)
        b = Agent("b", nb, api, keys["b"], lanes=2)
        a.boot()
        b.boot()
        a.sync()  # publishes a's WireguardNode
        b.sync()  # programs a, publishes b's
        a.sync()  # programs b
        b.sync()
        facts["two"] = {
            "links": _links(na),
            "route_a": _route(na, CIDR["b"]),
            "route_b": _route(nb, CIDR["a"]),
            "hash_a": _hash(na),
            "spec_lanes_a": api.wgnodes[NODE["a"]]["spec"].get("lanes", []),
            "lane1_key_file": a.cfg.lane_key_path(1).exists(),
            "ping": _ping(na, "a", "b", deadline=60),
        }
        wire = Capture(f, na, veth, "udp and portrange 51820-51821", tmp / "wire2.pcap")
        ab = Flows(f, tmp, "a", "b", ns, rounds=20, idle=3)
        ba = Flows(f, tmp, "b", "a", ns, rounds=20, idle=3)
        facts["two"]["ab"], facts["two"]["ba"] = ab.result(), ba.result()
        facts["two"]["pairs"] = _pairs(wire.lines())

        # 2. a's agent restarts with one lane, under flows both ways; its route to b's pods is
        # looked at all along. b has not read a's new WireguardNode yet.
        ab = Flows(f, tmp, "a", "b", ns, rounds=0, idle=5)
        ba = Flows(f, tmp, "b", "a", ns, rounds=0, idle=5)
        looker = Looker(f, na, CIDR["b"], tmp / "looks")
        started = time.monotonic()
        try:
            a.stop()
            a = Agent("a", na, api, keys["a"], lanes=1)
            a.boot()
            a.sync()  # publishes a's WireguardNode with one lane
        finally:
            looks = looker.stop()
        facts["restart_seconds"] = round(time.monotonic() - started, 2)
        facts["looks"] = len(looks)
        facts["looks_missing"] = sum(1 for r in looks if CIDR["b"] not in r)
        facts["looks_lane1"] = sum(1 for r in looks if f"{DEVICE}_1" in r)
        facts["retired"] = list(a.app.datapath.retired)
        facts["one"] = {
            "links": _links(na),
            "route_a": _route(na, CIDR["b"]),
            "hash_a": _hash(na),
            "hash_b": _hash(nb),
            "lane1_key_file": a.cfg.lane_key_path(1).exists(),
            "spec_a": api.wgnodes[NODE["a"]]["spec"],
            "status_lanes_a": api.wgnodes[NODE["a"]].get("status", {}).get("lanes"),
            "route_b_unseen": _route(nb, CIDR["a"]),
        }
        # Which lane each of b's flows to a takes while b has not read the change.
        facts["ba_lane_unseen"] = {
            str(40000 + k): _route_device(nb, POD["b"], POD["a"], 40000 + k) for k in range(FLOWS)
        }
        time.sleep(2)  # flows run a while in that state
        # 3. b reads a's WireguardNode.
        b.sync()
        time.sleep(1)
        facts["restart"] = {"ab": ab.result(), "ba": ba.result()}
        facts["seen"] = {
            "route_b": _route(nb, CIDR["a"]),
            "peers_b": {d: _peers(nb, d) for d in (DEVICE, f"{DEVICE}_1")},
            "a_lane0_key": _public_key(na, DEVICE),
            "hash_b": _hash(nb),
        }
        wire = Capture(f, na, veth, "udp and portrange 51820-51821", tmp / "wire1.pcap")
        ab = Flows(f, tmp, "a", "b", ns, rounds=20, idle=3)
        ba = Flows(f, tmp, "b", "a", ns, rounds=20, idle=3)
        facts["seen"]["ab"], facts["seen"]["ba"] = ab.result(), ba.result()
        facts["seen"]["pairs"] = _pairs(wire.lines())
        facts["seen"]["ping"] = _ping(na, "a", "b", deadline=30)
        facts["clear"] = clear.lines()[:20]
        facts["hash_end"] = _hash(na)
        # b's hash is b's agent's (it keeps two lanes): put back what the namespace had.
        multipath.restore(facts["hash_before"], netns=nb.name)
    return facts


if __name__ == "__main__":
    print(json.dumps(main()))
