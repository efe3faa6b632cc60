"""Inside the VM: how long a key rotation of a kernel-datapath node interrupts its traffic.

Run by tests/kernel/test_rotation.py with the peer's kind (wireguard-go, podwire-engine or
kernel); prints one JSON line. The kernel holds one private key and stops sending on its
sessions when it changes, so a rotation on the kernel datapath costs a handshake; this measures
the gap it leaves, in podwire's order and, for comparison, in the one it replaced:

  podwire        b's device takes the key at t0 and greets its peers, then the key is
                 published; a's watch changes b's peer at t0 + WATCH_LATENCY
                 (agent/controller.py `_keep_key`)
  publish_first  the key is published at t0; a changes b's peer at t0 + WATCH_LATENCY; b's
                 device takes it PUBLISH_FIRST_DELAY later, once its peers know it (an order
                 tried and measured worse: a peer that cannot rename drops its session with b
                 at once, and b's packets on it are lost until b switches)

b is programmed with the agent's own code (KernelBackend.set_private_key, then the requests of
wgdevice.greeting). a is programmed as its peer would be: podwire-engine and the kernel by
their agent's reconcile pass (podwire-engine renames the peer in place, UAPI `rename_to=`; the
kernel makes the new peer and removes the old), then its greeting; wireguard-go, which has no
rename and here no agent, by one UAPI request that adds the new peer with the allowed-ips and
removes the old one. Under a ping at 100 a second each way (and a TCP stream b -> a, when
iperf3 is here), each direction reports packets sent and lost and the longest time without a
reply; then whether traffic came back and with which key the peers handshook. The topology is
datapath.py's, whose helpers it uses:

ns k: node b (kernel WireGuard)                 ns u: node a (wireguard-go, podwire-engine, kernel)
wg 10.244.1.1/32 ------ tunnel ---------------- wg 10.244.2.1/32
veth 192.0.2.1/24, mtu 1400 ------------------- veth 192.0.2.2/24
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from pyroute2 import netns as pr_netns

# datapath.py sits beside this file; the VM runs both as scripts, not as a package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import datapath

from podwire.agent import config, keys, reconcile, wgdevice
from podwire.agent.datapath import backend as backend_mod
from podwire.agent.datapath import kernel, supervisor, userspace
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.netlink import links
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

RATE = 0.01  # seconds between pings: 100 a second each way
BEFORE = 2.0  # seconds of traffic before t0
AFTER = 6.0  # ... and after it
WATCH_LATENCY = 0.1  # from the key's publication to a's agent acting on it
STREAM_RATE = "4M"  # the TCP stream's pace: an emulated CPU carries the pings beside it
B_TUNNEL, A_TUNNEL = "10.244.1.1", "10.244.2.1"
B_HOST, A_HOST = "192.0.2.1", "192.0.2.2"
ORDERS = ("podwire", "publish_first")
PUBLISH_FIRST_DELAY = 1.0  # seconds from publishing to b's device change, in that order
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", re.M)


@dataclasses.dataclass
class Node:
    ns: netns_mod.Netns
    dev: str
    key: keys.PrivateKey
    backend: backend_mod.Backend
    routes: routes_mod.Routes


@dataclasses.dataclass
class Ping:
    """A ping at 100 a second in the background, its replies stamped (`-D`) in its log."""

    proc: subprocess.Popen[bytes]
    log: pathlib.Path
    count: int

    def result(self, t0: float, last_step: float) -> dict:
        self.proc.wait(self.count * RATE + 60)
        replies = [(float(t), int(s)) for t, s in _REPLY.findall(self.log.read_text())]
        stamps = sorted({t for t, _ in replies})
        received = len({s for _, s in replies})
        # The longest time without a reply, from the first one to the last.
        start, end = max(itertools.pairwise(stamps), key=lambda p: p[1] - p[0], default=(0, 0))
        return {
            "sent": self.count,
            "lost": self.count - received,
            "gap_ms": round((end - start) * 1000),
            "gap_from": round(start - t0, 3),  # seconds after t0
            "gap_to": round(end - t0, 3),
            # Replies after the rotation's last step, and the time of the first of them.
            "after_rotation": sum(1 for t in stamps if t > t0 + last_step),
            "first_after": round(min((t for t in stamps if t > t0 + last_step), default=0) - t0, 3),
        }


def _ping(f: netns_mod.NetnsFactory, ns: netns_mod.Netns, target: str, log: pathlib.Path) -> Ping:
    count = int((BEFORE + AFTER) / RATE)
    argv = ["ping", "-n", "-D", "-i", str(RATE), "-c", str(count), "-W", "2", target]
    return Ping(f.spawn(ns, argv, log_path=log), log, count)


@dataclasses.dataclass
class Stream:
    """An iperf3 TCP stream from b to a (a receives: `-R`), reported every 100 ms by a."""

    proc: subprocess.Popen[bytes]
    log: pathlib.Path

    def result(self) -> dict:
        self.proc.wait(BEFORE + AFTER + 60)
        text = self.log.read_text(errors="replace")
        try:
            report = json.loads(text[text.index("{") :])
        except ValueError:
            return {"error": text[-500:]}
        if "error" in report:
            return {"error": report["error"]}
        longest = run = 0.0
        for interval in report["intervals"]:
            run = run + interval["sum"]["seconds"] if interval["sum"]["bytes"] == 0 else 0.0
            longest = max(longest, run)
        received = report["end"]["sum_received"]
        return {"gap_ms": round(longest * 1000), "mbit_per_s": received["bits_per_second"] / 1e6}


def _stream(f: netns_mod.NetnsFactory, b: Node, a: Node, logs: pathlib.Path, port: int) -> Stream:
    iperf = tools.path("iperf3")
    f.spawn(b.ns, [iperf, "-s", "-1", "-B", B_TUNNEL, "-p", str(port)], log_path=logs / "srv")
    netns_mod.wait_until(
        lambda: bool(b.ns.run("ss", "-Hltn", f"sport = :{port}").stdout.strip()),
        timeout=60, what="iperf3 listening",
    )  # fmt: skip
    argv = [iperf, "-c", B_TUNNEL, "-p", str(port), "-R", "-b", STREAM_RATE,
            "-t", str(int(BEFORE + AFTER)), "-i", "0.1", "-J", "--connect-timeout", "5000"]  # fmt: skip
    log = logs / f"stream-{port}.json"
    return Stream(f.spawn(a.ns, argv, log_path=log), log)


def _bring_up(
    f: netns_mod.NetnsFactory, peer_kind: str, logs: pathlib.Path
) -> tuple[Node, Node, float]:
    """b as datapath.py makes the agent's kernel side, a as its peer; both programmed.
    Returns them and how long a's device took to start."""
    k, u = f.namespace("k"), f.namespace("u")
    f.veth(k, u, a_addr=f"{B_HOST}/24", b_addr=f"{A_HOST}/24", mtu=1400)
    k.ip("route", "add", "default", "via", A_HOST)
    u.ip("route", "add", "default", "via", B_HOST)
    b = _kernel_node(f, k)
    started = time.monotonic()
    a = _kernel_node(f, u) if peer_kind == "kernel" else _userspace_node(f, u, peer_kind, logs)
    start_seconds = time.monotonic() - started
    for node, cidr in ((b, datapath.K_CIDR), (a, datapath.U_CIDR)):
        node.backend.set_private_key(node.key.raw)
        node.backend.set_listen_port(datapath.PORT)
        links.add_address(node.dev, f"{cidr.network_address + 1}/32", netns=node.ns.name)
    datapath._program(b.backend, b.routes, datapath._desired("a", a.key, A_HOST, datapath.U_CIDR))
    datapath._program(a.backend, a.routes, datapath._desired("b", b.key, B_HOST, datapath.K_CIDR))
    return b, a, start_seconds


def _kernel_node(f: netns_mod.NetnsFactory, ns: netns_mod.Netns) -> Node:
    """What PODWIRE_DATAPATH=auto makes of this kernel, in the node's namespace."""
    dev = f.unique("w")
    env = {"NODE_NAME": ns.name, "PODWIRE_DATAPATH": "auto", "PODWIRE_DEVICE": dev,
           "PODWIRE_CLUSTER_POD_CIDRS": datapath.CLUSTER, "PODWIRE_LISTEN_PORT": str(datapath.PORT)}  # fmt: skip
    node = Node(ns, dev, keys.PrivateKey.generate(), *datapath._select(config.load(environ=env), ns.name))  # fmt: skip
    assert isinstance(node.backend, kernel.KernelBackend), type(node.backend)
    node.backend.ensure_device()
    return node


def _userspace_node(
    f: netns_mod.NetnsFactory, ns: netns_mod.Netns, peer_kind: str, logs: pathlib.Path
) -> Node:
    if peer_kind == "wireguard-go":
        command = [tools.path("wireguard-go")]
        engine_env = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    else:
        command, engine_env = list(supervisor.default_command()), {}
    dev = f.unique("w")
    device = userspace.UserspaceBackend(
        dev, engine_command=command, engine_env=engine_env, netns=ns.name,
        engine_log=logs / "peer.log", start_timeout=240,
    )  # fmt: skip
    subprocess.run(["modprobe", "tun"], check=True)  # no udev in the VM to make /dev/net/tun
    device.ensure_device()
    assert device.engine.process is not None
    f.processes.append(device.engine.process)  # ended by PID with the namespaces
    return Node(ns, dev, keys.PrivateKey.generate(), device, routes_mod.Routes(dev, netns=ns.name))


def _here(node: Node) -> backend_mod.Backend:
    """node's device as its agent opens it from inside the node's namespace (see _inside):
    a kernel device then needs no helper process per netlink call to reach it."""
    return kernel.KernelBackend(node.dev) if node.backend.datapath == "kernel" else node.backend


def _a_follows(peer_kind: str, device: backend_mod.Backend, old: str, new: keys.PrivateKey) -> None:
    """a learns b's new key: as its podwire agent programs it (podwire-engine, kernel), or as
    an operator would program an agent-less wireguard-go, which has no rename."""
    (want,) = datapath._desired("b", new, B_HOST, datapath.K_CIDR)
    if peer_kind == "wireguard-go":
        device.apply([
            wgdevice.PeerChange(want.public_key, endpoint=want.endpoint,
                                allowed_ips=want.allowed_ips, replace_allowed_ips=True),
            wgdevice.PeerChange(old, remove=True),
        ])  # fmt: skip
        return
    # The reconciler's pass (reconciler.Reconciler._program_peers): b's peer is renamed, and
    # greeted so that the handshake with its new key starts now.
    plan = reconcile.plan_peers([want], device.read().peers, synced=True)
    device.apply(reconcile.plan_changes(plan))
    for request in wgdevice.greeting([r.peer.public_key for r in plan.rename]):
        device.apply(request)


def _b_rotates(device: backend_mod.Backend, new: keys.PrivateKey) -> None:
    """What b's controller does once the key is due on the device (_keep_key, _key_applied)."""
    device.set_private_key(new.raw)
    for request in wgdevice.greeting([p.public_key for p in device.read().peers]):
        device.apply(request)


def _measure(
    f: netns_mod.NetnsFactory, peer_kind: str, order: str, b: Node, a: Node, logs: pathlib.Path
) -> dict:
    new = keys.PrivateKey.generate()
    old_public = b.key.public_key_b64()
    a_follows = ("a_follows", a, lambda: _a_follows(peer_kind, _here(a), old_public, new))
    b_rotates = ("b_rotates", b, lambda: _b_rotates(_here(b), new))
    steps: list[tuple[str, Node, Callable[[], None], float]] = (
        [(*b_rotates, 0.0), (*a_follows, WATCH_LATENCY)]
        if order == "podwire"
        else [(*a_follows, WATCH_LATENCY), (*b_rotates, PUBLISH_FIRST_DELAY)]
    )
    logs = logs / order
    logs.mkdir()
    stream = _stream(f, b, a, logs, 5201 + ORDERS.index(order)) if shutil.which("iperf3") else None
    forth = _ping(f, a.ns, B_TUNNEL, logs / "a_to_b.ping")
    back = _ping(f, b.ns, A_TUNNEL, logs / "b_to_a.ping")
    time.sleep(BEFORE)
    t0, started = time.time(), time.monotonic()
    took: dict[str, list[float]] = {}
    for name, node, step, at in steps:
        time.sleep(max(0.0, started + at - time.monotonic()))
        took[name] = [round(time.monotonic() - started, 3)]
        with _inside(node.ns.name):
            step()
        took[name].append(round(time.monotonic() - started, 3))
    last_step = max(end for _, end in took.values())
    facts: dict = {
        "steps": took,  # name: [began, ended], seconds after t0
        "a_to_b": forth.result(t0, last_step),
        "b_to_a": back.result(t0, last_step),
        "stream": stream.result() if stream else None,
        "ping_after": {
            "a_to_b": a.ns.ping(B_TUNNEL, count=3, timeout=10),
            "b_to_a": b.ns.ping(A_TUNNEL, count=3, timeout=10),
        },
    }
    b.key = new
    facts.update(_handshakes(b, a, old_public, t0))
    return facts


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    """This thread in the named namespace for a while (pyroute2's pushns/popns)."""
    pr_netns.pushns(name)
    try:
        yield
    finally:
        pr_netns.popns()


def _handshakes(b: Node, a: Node, old: str, t0: float) -> dict:
    """Which key each side holds for the other, and how long after t0 it last handshook."""
    a_peers = {p.public_key: p.last_handshake for p in a.backend.read().peers}
    b_device = b.backend.read()
    (b_peer,) = b_device.peers
    new = b.key.public_key_b64()
    return {
        "b_device_key_is_new": b_device.public_key == new,
        "a_peer_keys": ["new" if k == new else "old" if k == old else k for k in a_peers],
        "a_handshake_after_t0": _since(a_peers.get(new), t0),
        "b_handshake_after_t0": _since(b_peer.last_handshake, t0),
    }


def _since(when: float | None, t0: float) -> float | None:
    return None if when is None else round(when - t0, 3)


def main(peer_kind: str) -> dict:
    facts: dict = {"peer_kind": peer_kind, "iperf3": shutil.which("iperf3") is not None,
                   "rate_per_s": round(1 / RATE), "watch_latency": WATCH_LATENCY,
                   "publish_first_delay": PUBLISH_FIRST_DELAY}  # fmt: skip
    logs = pathlib.Path(tempfile.mkdtemp())
    try:
        with netns_mod.factory("pwr") as f:
            b, a, facts["peer_start_seconds"] = _bring_up(f, peer_kind, logs)
            facts["first_ping"] = b.ns.ping(A_TUNNEL, count=3, timeout=60)
            facts["first_ping_back"] = a.ns.ping(B_TUNNEL, count=3, timeout=30)
            for order in ORDERS:
                facts[order] = _measure(f, peer_kind, order, b, a, logs)
            engine_log = logs / "peer.log"  # a userspace peer's
            facts["peer_log"] = (
                engine_log.read_text(errors="replace")[-3000:] if engine_log.exists() else ""
            )
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return facts


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
