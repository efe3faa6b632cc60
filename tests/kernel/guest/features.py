"""Inside the VM: the kernel features the agent applies, read back from the kernel.

Run by tests/kernel/test_features.py; prints one JSON line. For each case a node namespace
with a veth underlay gets the device `podwire-agent` makes for that configuration (config.load
from the environment -> select.open_backend -> ensure_device), and the case reports what the agent
says is in force (Backend.features(), which the agent publishes in its status) next to what
the kernel says: the device's sizes from `ip -d -j link` of an iproute2 new enough to print the
IPv4 BIG TCP sizes (hack/kernel/fetch.sh), and the underlay's UDP GRO forwarding from
`ethtool -k`. Neither reading goes through podwire's own netlink code.

ns node                                   ns peer
wg (kernel WireGuard) 10.244.1.1 -------- wg (kernel WireGuard) 10.244.2.1, for the traffic case
veth 192.0.2.1/24 (the underlay) -------- veth 192.0.2.2/24
default via 192.0.2.2                     default via 192.0.2.1
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pathlib
import socket
import subprocess
import threading
import time

from pyroute2 import config as pr_config
from pyroute2 import netns as pr_netns

from podwire.agent import config, keys, reconcile, wgdevice
from podwire.agent.datapath import backend as backend_mod
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.datapath import select
from podwire.agent.netlink import links
from podwire.sandbox import netns as netns_mod

pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

IP = str(
    pathlib.Path(__file__).resolve().parents[3] / ".cache" / "kernel" / "iproute2" / "bin" / "ip"
)
SIZES = ("gso_max_size", "gro_max_size", "gso_ipv4_max_size", "gro_ipv4_max_size", "tso_max_size")
CASES = {
    "all_on": {},
    "gro_off": {"PODWIRE_GRO": "false"},
    "big_tcp_off": {"PODWIRE_BIG_TCP": "false"},
    "udp_gro_forwarding_off": {"PODWIRE_UDP_GRO_FORWARDING": "false"},
}
PAYLOAD = 16 * 2**20
ALL_OFF = {"PODWIRE_GRO": "0", "PODWIRE_BIG_TCP": "0", "PODWIRE_UDP_GRO_FORWARDING": "0",
           "PODWIRE_THREADED_NAPI": "0"}  # fmt: skip


def _sizes(ns: netns_mod.Netns, dev: str) -> dict[str, int | None]:
    link = json.loads(ns.run(IP, "-d", "-j", "link", "show", "dev", dev).stdout)[0]
    return {name: link.get(name) for name in SIZES}


def _udp_gro_forwarding(ns: netns_mod.Netns, dev: str) -> str:
    for line in ns.run("ethtool", "-k", dev).stdout.splitlines():
        if line.strip().startswith("rx-udp-gro-forwarding:"):
            return line.split(":", 1)[1].strip()
    return "absent"


def _agent(
    ns: netns_mod.Netns, dev: str, env: dict[str, str]
) -> tuple[backend_mod.Backend, routes_mod.Routes]:
    cfg = config.load(environ={"NODE_NAME": "node", "PODWIRE_DEVICE": dev,
                               "PODWIRE_DATAPATH": "auto", "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16", **env})  # fmt: skip
    backend, routes = _select(cfg, ns.name)
    backend.ensure_device()
    return backend, routes


def _traffic(f: netns_mod.NetnsFactory) -> dict:
    """TCP through two kernel WireGuard devices with every feature on: all of it arrives."""
    node, peer = f.namespace("n"), f.namespace("p")
    f.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    node.ip("route", "add", "default", "via", "192.0.2.2")
    peer.ip("route", "add", "default", "via", "192.0.2.1")
    sides = {}
    for ns, cidr in ((node, "10.244.1.0/24"), (peer, "10.244.2.0/24")):
        dev, key = f.unique("w"), keys.PrivateKey.generate()
        backend, routes = _agent(ns, dev, {})
        backend.set_private_key(key.raw)
        backend.set_listen_port(51820)
        net = ipaddress.ip_network(cidr)
        links.add_address(dev, f"{net.network_address + 1}/32", netns=ns.name)
        sides[ns.name] = (backend, routes, key, net)
    for ns, other, host in ((node, peer, "192.0.2.2"), (peer, node, "192.0.2.1")):
        backend, routes, _, _ = sides[ns.name]
        _, _, key, net = sides[other.name]
        want = [reconcile.DesiredPeer(other.name, key.public_key_b64(),
                                      wgdevice.Endpoint(host, 51820), (net,))]  # fmt: skip
        backend.apply(
            reconcile.plan_changes(reconcile.plan_peers(want, backend.read().peers, synced=True))
        )
        routes.apply(reconcile.plan_routes(want, routes.list_routes(), synced=True))
    payload = os.urandom(PAYLOAD)
    listener = pr_netns.create_socket(peer.name, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("10.244.2.1", 5201))
    listener.listen(1)
    received = hashlib.sha256()
    count = [0]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received.update(chunk)
                count[0] += len(chunk)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    started = time.monotonic()
    client = pr_netns.create_socket(node.name, socket.AF_INET, socket.SOCK_STREAM)
    with client:
        client.settimeout(120)
        client.connect(("10.244.2.1", 5201))
        client.sendall(payload)
    server.join(120)
    listener.close()
    seconds = time.monotonic() - started
    return {
        "features": [sides[ns.name][0].features() for ns in (node, peer)],
        "bytes_received": count[0],
        "intact": received.hexdigest() == hashlib.sha256(payload).hexdigest(),
        "mbit_per_s": round(count[0] * 8 / seconds / 1e6, 1),
        "seconds": round(seconds, 1),
    }


def _report(backend: backend_mod.Backend, ns: netns_mod.Netns, dev: str, underlay: str) -> dict:
    return {
        "datapath": backend.datapath,
        "reported": backend.features(),
        "sizes": _sizes(ns, dev),
        "udp_gro_forwarding": _udp_gro_forwarding(ns, underlay),
    }


def main() -> dict:
    version = subprocess.run([IP, "-V"], capture_output=True, text=True, check=True).stdout
    facts: dict = {"ip_version": version.strip()}
    with netns_mod.factory("pwf") as f:
        for case, env in CASES.items():
            node, peer = f.namespace("n"), f.namespace("p")
            underlay, _ = f.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
            node.ip("route", "add", "default", "via", "192.0.2.2")
            dev = f.unique("w")
            before = _udp_gro_forwarding(node, underlay)
            backend, _ = _agent(node, dev, env)
            facts[case] = {"underlay_before": before, **_report(backend, node, dev, underlay)}
            if case == "all_on":
                # The agent restarted with every feature turned off, on the device it left.
                again, _ = _agent(node, dev, ALL_OFF)
                facts["restarted_all_off"] = _report(again, node, dev, underlay)
        facts["traffic"] = _traffic(f)
    return facts


def _select(cfg: config.Config, netns: str) -> tuple[backend_mod.Backend, routes_mod.Routes]:
    """What the agent's datapath component opens for this config, in the node's namespace."""
    return select.open_backend(cfg, netns=netns), routes_mod.Routes(cfg.device, netns=netns)


if __name__ == "__main__":
    print(json.dumps(main()))
