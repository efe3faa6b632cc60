"""Inside the VM: the advisories the agent's datapath component finds on a kernel WireGuard
device, and threaded NAPI applied by podwire's feature and read back.

Run by tests/kernel/test_advisories.py (in VMs booted with `init_on_alloc=1` and `=0`); prints
one JSON line. The datapath component (`component.Datapath`, as the agent assembles it, with
`select.open_backend` for the config from the environment) brings the device up in a node
namespace; the case reports its advisories and features next to what the kernel says, read
with `cat` of sysfs in the namespace (`ip netns exec`, not podwire's code) and /proc/cmdline.

ns node                                   ns peer
wg (kernel WireGuard), one peer
veth 192.0.2.1/24 (the underlay) -------- veth 192.0.2.2/24
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import tempfile

from pyroute2 import config as pr_config

from podwire.agent import config, keys, keystore, reconcile, wgdevice
from podwire.agent.datapath import component, select
from podwire.agent.datapath import routes as routes_mod
from podwire.sandbox import netns as netns_mod

pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

PEER_KEY = keys.PrivateKey.generate()
OFFLOADS_OFF = {"PODWIRE_GRO": "0", "PODWIRE_BIG_TCP": "0", "PODWIRE_UDP_GRO_FORWARDING": "0"}


def _ethtool(ns: netns_mod.Netns, dev: str) -> str:
    """The underlay's UDP GRO forwarding as `ethtool -k` says it."""
    for line in ns.run("ethtool", "-k", dev).stdout.splitlines():
        if line.strip().startswith("rx-udp-gro-forwarding:"):
            return line.split(":", 1)[1].strip()
    return "absent"


def _threaded(ns: netns_mod.Netns, dev: str) -> str:
    """The device's threaded NAPI as sysfs shows it in ns: "0", "1" or why it cannot be read."""
    done = ns.run("cat", f"/sys/class/net/{dev}/threaded", check=False)
    return done.stdout.strip() if done.returncode == 0 else f"unreadable: {done.stderr.strip()}"


def _write_threaded(ns: netns_mod.Netns, dev: str, value: str) -> str:
    """What an operator would do by hand; "" or the error."""
    done = ns.run("sh", "-c", f"echo {value} > /sys/class/net/{dev}/threaded", check=False)
    return "" if done.returncode == 0 else done.stderr.strip()


def _datapath(
    ns: netns_mod.Netns, dev: str, env: dict[str, str], folder: pathlib.Path
) -> component.Datapath:
    """The agent's datapath component for this config, up on the node's underlay."""
    cfg = config.load(environ={"NODE_NAME": "node", "PODWIRE_DEVICE": dev,
                               "PODWIRE_DATAPATH": "kernel", "PODWIRE_FAIL_CLOSED": "false",
                               "PODWIRE_KEY_PATH": str(folder / "private.key"), **env})  # fmt: skip
    store = keystore.KeyStore(cfg.key_path)
    store.start()
    datapath = component.Datapath(
        device=dev,
        listen_port=51820,
        cluster_pod_cidrs=(),
        fail_closed=False,
        open_backend=lambda address: select.open_backend(
            cfg, netns=ns.name, underlay_address=address
        ),
        routes=routes_mod.Routes(dev, netns=ns.name),
        keys=store,
        netns=ns.name,
    )
    datapath.bring_up("192.0.2.1")
    return datapath


def _add_peer(datapath: component.Datapath) -> None:
    """One peer, as a reconcile pass would add it: the device's first NAPI instance."""
    want = [reconcile.DesiredPeer("peer", PEER_KEY.public_key_b64(),
                                  wgdevice.Endpoint("192.0.2.2", 51820),
                                  (ipaddress.ip_network("10.244.2.0/24"),))]  # fmt: skip
    backend = datapath.require()
    backend.apply(
        reconcile.plan_changes(reconcile.plan_peers(want, backend.read().peers, synced=True))
    )


def _report(datapath: component.Datapath, ns: netns_mod.Netns, dev: str) -> dict:
    return {
        "features": list(datapath.features),
        "advisories": {a.name: a.message for a in datapath.advisories},
        "threaded": _threaded(ns, dev),
    }


def main() -> dict:
    facts: dict = {"cmdline": pathlib.Path("/proc/cmdline").read_text().strip()}
    with netns_mod.factory("pwa") as f, tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        node, peer = f.namespace("n"), f.namespace("p")
        f.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
        node.ip("route", "add", "default", "via", "192.0.2.2")
        dev = f.unique("w")

        # The agent with threaded NAPI turned off: it leaves the device as the kernel made it.
        off = _datapath(node, dev, {"PODWIRE_THREADED_NAPI": "false"}, folder)
        facts["fresh_off"] = _report(off, node, dev)
        _add_peer(off)
        # The operator (or an older kernel's default) has it off; the resync sees that.
        facts["written_off"] = _write_threaded(node, dev, "0")
        off.survey()
        facts["off"] = _report(off, node, dev)

        # The agent restarted with the feature on (the default), on the device it left.
        on = _datapath(node, dev, {}, folder)
        facts["on"] = _report(on, node, dev)
        on.survey()
        facts["on_resync"] = _report(on, node, dev)

        # GRO, BIG TCP and UDP GRO forwarding turned off, on a node of their own (the first
        # agent turned its underlay's forwarding on), then the agent restarted with them on.
        node, peer = f.namespace("n"), f.namespace("p")
        underlay, _ = f.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
        node.ip("route", "add", "default", "via", "192.0.2.2")
        dev = f.unique("w")
        low = _datapath(node, dev, OFFLOADS_OFF, folder)
        facts["offloads_off"] = {**_report(low, node, dev), "ethtool": _ethtool(node, underlay)}
        high = _datapath(node, dev, {}, folder)
        facts["offloads_on"] = {**_report(high, node, dev), "ethtool": _ethtool(node, underlay)}
    return facts


if __name__ == "__main__":
    print(json.dumps(main()))
