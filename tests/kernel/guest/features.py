"""Inside the VM: the kernel features the agent applies, read back from the kernel.

Run by tests/kernel/test_features.py; prints one JSON line. For each case a node namespace
with a veth underlay gets the device `podwire-agent` makes for that configuration (config.load
from the environment -> datapath.select -> ensure_device), and the case reports what the agent
says is in force (Backend.features(), which the agent publishes in its status) next to what
the kernel says: the device's sizes from `ip -d -j link` of an iproute2 new enough to print the
IPv4 BIG TCP sizes (hack/kernel/fetch.sh), and the underlay's UDP GRO forwarding from
`ethtool -k`. Neither reading goes through podwire's own netlink code.

ns node                                   ns peer
wg (kernel WireGuard)
veth 192.0.2.1/24 (the underlay) -------- veth 192.0.2.2/24
default via 192.0.2.2
"""

from __future__ import annotations

import json
import pathlib
import subprocess

from pyroute2 import config as pr_config

from podwire.agent import config, datapath
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
ALL_OFF = {"PODWIRE_GRO": "0", "PODWIRE_BIG_TCP": "0", "PODWIRE_UDP_GRO_FORWARDING": "0"}


def _sizes(ns: netns_mod.Netns, dev: str) -> dict[str, int | None]:
    link = json.loads(ns.run(IP, "-d", "-j", "link", "show", "dev", dev).stdout)[0]
    return {name: link.get(name) for name in SIZES}


def _udp_gro_forwarding(ns: netns_mod.Netns, dev: str) -> str:
    for line in ns.run("ethtool", "-k", dev).stdout.splitlines():
        if line.strip().startswith("rx-udp-gro-forwarding:"):
            return line.split(":", 1)[1].strip()
    return "absent"


def _agent(ns: netns_mod.Netns, dev: str, env: dict[str, str]) -> datapath.Backend:
    cfg = config.load(environ={"NODE_NAME": "node", "PODWIRE_DEVICE": dev,
                               "PODWIRE_DATAPATH": "auto", "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16", **env})  # fmt: skip
    backend, _ = datapath.select(cfg, netns=ns.name)
    backend.ensure_device()
    return backend


def _report(backend: datapath.Backend, ns: netns_mod.Netns, dev: str, underlay: str) -> dict:
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
            backend = _agent(node, dev, env)
            facts[case] = {"underlay_before": before, **_report(backend, node, dev, underlay)}
            if case == "all_on":
                # The agent restarted with every feature turned off, on the device it left.
                again = _agent(node, dev, ALL_OFF)
                facts["restarted_all_off"] = _report(again, node, dev, underlay)
    return facts


if __name__ == "__main__":
    print(json.dumps(main()))
