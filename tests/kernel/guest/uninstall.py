"""Inside the VM: an uninstall on the kernel datapath, from the node's side.

Run by tests/kernel/test_uninstall.py through the VM's command server; prints one JSON line of
what it saw. The agent is `podwire-agent` as `app.assemble` builds it, with its real datapath
(kernel WireGuard, two lanes, strictMode, fail-closed) in namespace a, which this process
enters as the agent runs in its node's network. No apiserver runs in the VM: the agent's
Kubernetes side is tests/support/agentfakes.py's FakeApi and watch sources, and the uninstall
request is the annotation `podwire prepare-uninstall` writes, put on the agent's own
WireguardNode there.

ns a (the agent)                                    ns b (the peer, made with `wg`)
lo 10.244.1.1/32 ("the pod")                        lo 10.244.2.1/32
podwire_wg0   (kernel wg, 51820) ================== wb0 (51820)
podwire_wg0_1 (kernel wg, 51821) ================== wb1 (51821)
route 10.244.2.0/24 multipath over both, proto 251  route 10.244.1.0/24 dev wb0
unreachable 10.244.0.0/16 (backstop), rules 5200/5210, fib_multipath_hash_policy 1
veth 192.0.2.1/24 ---------------------------------- veth 192.0.2.2/24

1. The agent starts and programs its peer; a's pod pings b's.
2. The agent stops, not armed (a restart, an upgrade): the devices, routes, rules and the hash
   stay as they were, the device keeps its key, and the ping still goes through.
3. A new agent starts on the same node (it finds its devices), the request arms it
   (condition UninstallArmed), it stops: no podwire link, no proto-251 route in any table of
   either family, no podwire rule, the hash back to 0; the key file stays.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

from pyroute2 import config as pr_config

from podwire.agent import app, config, watches
from podwire.agent import clock as clock_mod
from podwire.agent.netlink import routes as nl_routes
from podwire.agent.netlink import rules as nl_rules
from podwire.api import wgnode
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "support"))
import agentfakes  # the tests' doubles, beside this tier

pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

NODE, PEER = "node-a", "node-b"
DEVICE = "podwire_wg0"
PORT = 51820
CLUSTER = "10.244.0.0/16"
POD = {"a": "10.244.1.1", "b": "10.244.2.1"}
CIDR = {"a": "10.244.1.0/24", "b": "10.244.2.0/24"}
UNDERLAY = {"a": "192.0.2.1", "b": "192.0.2.2"}
HASH = ("net.ipv4.fib_multipath_hash_policy", "net.ipv6.fib_multipath_hash_policy")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class Agent:
    """One run of the agent on node a: assembled as `podwire-agent` is, with the apiserver's
    part played by the fakes; the process is in a's network namespace."""

    def __init__(self, key_path: pathlib.Path, peer: dict) -> None:
        env = {"NODE_NAME": NODE, "PODWIRE_DATAPATH": "kernel", "PODWIRE_DEVICE": DEVICE,
               "PODWIRE_CLUSTER_POD_CIDRS": CLUSTER, "PODWIRE_LISTEN_PORT": str(PORT),
               "PODWIRE_LANES": "2", "PODWIRE_STRICT_MODE": "true",
               "PODWIRE_KEY_PATH": str(key_path)}  # fmt: skip
        cfg = self.cfg = config.load(environ=env)
        self.api = agentfakes.FakeApi()
        self.api.nodes[NODE] = agentfakes.node(NODE, UNDERLAY["a"], [CIDR["a"]])
        self.wakeup = threading.Event()
        self.nodes = agentfakes.MemorySource("nodes", on_change=self.wakeup.set)
        self.wgnodes = agentfakes.MemorySource("wgnodes", on_change=self.wakeup.set)
        self.api.on_write = self.wgnodes.put
        self.peer = peer

        self.app = app.assemble(
            cfg,
            api=self.api,
            api_error=agentfakes.FakeApiError,
            emit=self.api.emit_event,
            watched=watches.Watches(self.nodes, self.wgnodes),
            wakeup=self.wakeup,
            **app.node_parts(cfg),
            clock=clock_mod.MonotonicClock(),
        )

    def boot(self) -> None:
        """The agent's start: fail-closed, the key, the devices (found if they exist)."""
        assert self.app.start(threading.Event(), loop=False)

    def sync(self) -> None:
        """The watches list (the own Node and WireguardNode, the peer's), then control-loop
        turns: the peer and its routes programmed, the own object published."""
        self.nodes.list([self.api.nodes[NODE], agentfakes.node(PEER, UNDERLAY["b"], [CIDR["b"]])])
        self.wgnodes.list([*(copy.deepcopy(o) for o in self.api.wgnodes.values()), self.peer])
        for _ in range(3):
            self.app.controller.step(woke=True)

    def arm(self) -> None:
        """The uninstall request, as `podwire prepare-uninstall` writes it, on the own object."""
        own = copy.deepcopy(self.api.wgnodes[NODE])
        own["metadata"].setdefault("annotations", {})[wgnode.UNINSTALL_ANNOTATION] = (
            wgnode.format_precise_time(time.time())
        )
        self.api.replace_wgnode(own)
        for _ in range(3):
            if self.app.controller.uninstall_armed:
                break
            self.app.controller.step(woke=True)

    def condition(self, kind: str) -> str:
        for c in self.api.wgnodes[NODE].get("status", {}).get("conditions", []):
            if c["type"] == kind:
                return f"{c['status']}/{c['reason']}"
        return ""


def podwire_on(ns: netns_mod.Netns) -> dict[str, list[str]]:
    """What of podwire's `ip` shows in the namespace: its links, routes of its protocol (or
    through its devices) in any table of either family, its rules; and the multipath hash."""
    links = [
        f"{link['ifname']} {link.get('linkinfo', {}).get('info_kind', '')}"
        for link in json.loads(ns.ip("-d", "-j", "link", "show").stdout)
        if link["ifname"].startswith(DEVICE)
    ]
    routes = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "route", "show", "table", "all").stdout.splitlines()
        if f"proto {nl_routes.PROTO}" in line or DEVICE in line
    ]
    priorities = (f"{nl_rules.INBOUND_PRIORITY}:", f"{nl_rules.LOOKUP_PRIORITY}:")
    rules = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "rule", "show").stdout.splitlines()
        if line.startswith(priorities)
    ]
    hashes = [f"{k}={ns.run('sysctl', '-n', k).stdout.strip()}" for k in HASH]
    return {"links": sorted(links), "routes": sorted(routes), "rules": sorted(rules),
            "hash": hashes}  # fmt: skip


def public_keys(ns: netns_mod.Netns) -> dict[str, str]:
    wg = tools.path("wg")
    return {d: ns.run(wg, "show", d, "public-key").stdout.strip() for d in (DEVICE, f"{DEVICE}_1")}


def ping(ns: netns_mod.Netns, *, deadline: int = 25) -> bool:
    """a's pod reaches b's (the first packets may wait for a handshake under emulation)."""
    argv = ["ping", "-n", "-q", "-c", "3", "-I", POD["a"], "-w", str(deadline), POD["b"]]
    return ns.run(*argv, check=False, timeout=deadline + 20).returncode == 0


def make_peer(nb: netns_mod.Netns, tmp: pathlib.Path, a_keys: dict[str, str]) -> dict:
    """b's two devices, each peered with a's lane of the same index; b's WireguardNode."""
    wg = tools.path("wg")
    published = []
    for lane, (dev, a_dev) in enumerate((("wb0", DEVICE), ("wb1", f"{DEVICE}_1"))):
        key = tmp / f"b{lane}.key"
        key.write_text(nb.run(wg, "genkey").stdout)  # the test peer's key, 0600 below
        key.chmod(0o600)
        nb.ip("link", "add", dev, "type", "wireguard")
        nb.run(wg, "set", dev, "private-key", str(key), "listen-port", str(PORT + lane),
               "peer", a_keys[a_dev], "endpoint", f"{UNDERLAY['a']}:{PORT + lane}",
               "allowed-ips", CIDR["a"])  # fmt: skip
        nb.ip("link", "set", dev, "up")
        published.append(nb.run(wg, "show", dev, "public-key").stdout.strip())
    nb.ip("route", "add", CIDR["a"], "dev", "wb0")
    obj = agentfakes.wgnode_obj(PEER, published[0], PORT)
    obj["spec"]["lanes"] = [{"publicKey": published[1], "listenPort": PORT + 1}]
    return obj


def main() -> dict:
    facts: dict = {}
    tmp = pathlib.Path(tempfile.mkdtemp())
    key_path = tmp / "state" / "private.key"
    key_path.parent.mkdir(mode=0o700)
    home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    with netns_mod.factory("pwu") as f:
        na, nb = f.namespace("a"), f.namespace("b")
        f.veth(na, nb, a_addr=f"{UNDERLAY['a']}/24", b_addr=f"{UNDERLAY['b']}/24", mtu=1400)
        na.ip("addr", "add", f"{POD['a']}/32", "dev", "lo")
        nb.ip("addr", "add", f"{POD['b']}/32", "dev", "lo")
        facts["before"] = podwire_on(na)
        _setns(f"/var/run/netns/{na.name}")  # the agent runs in its node's network
        try:
            # 1. The agent starts; its peer b learns its lanes' keys.
            placeholder = agentfakes.wgnode_obj(PEER, agentfakes.other_node(2).public_key, PORT)
            first = Agent(key_path, placeholder)
            first.boot()
            a_keys = public_keys(na)
            first.peer = make_peer(nb, tmp, a_keys)
            first.sync()
            facts["ping_started"] = ping(na)
            facts["made"] = podwire_on(na)
            # 2. A stop not armed: everything stays, the key too, and traffic flows on.
            first.app.stop()
            facts["after_plain_stop"] = podwire_on(na)
            facts["keys_kept"] = public_keys(na) == a_keys
            facts["ping_after_plain_stop"] = ping(na)
            facts["armed_first"] = first.app.controller.uninstall_armed
            # 3. The next agent finds its devices, is armed by the request, stops.
            second = Agent(key_path, first.peer)
            second.boot()
            second.sync()
            facts["second_keys_same"] = public_keys(na) == a_keys
            facts["ping_second"] = ping(na)
            second.arm()
            facts["armed"] = second.app.controller.uninstall_armed
            facts["condition"] = second.condition(wgnode.UNINSTALL_ARMED)
            second.app.stop()
            facts["after_armed_stop"] = podwire_on(na)
            facts["key_file_kept"] = key_path.exists()
            facts["ping_after_armed_stop"] = ping(na, deadline=5)
            route = na.run("ip", "route", "get", POD["b"], "from", POD["a"], check=False)
            facts["route_after_armed_stop"] = (route.stdout + route.stderr).strip()
        finally:
            if _libc.setns(home_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the guest's namespace")
            os.close(home_fd)
    return facts


if __name__ == "__main__":
    print(json.dumps(main()))
