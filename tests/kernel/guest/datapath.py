"""Inside the VM: the agent's kernel datapath against a userspace WireGuard peer.

Run by tests/kernel/test_datapath.py through the VM's command server; prints one JSON line of
what it saw, which the host test asserts on. The kernel side is what `podwire-agent` builds with
PODWIRE_DATAPATH=auto: config.load -> select.open_backend -> KernelBackend and Routes, programmed
with plans from reconcile, exactly as tests/integration/datapath drives the userspace backend.

ns k (the agent, kernel WireGuard)              ns u (the peer: wireguard-go or podwire-engine)
wg 10.244.1.1/32 ------ tunnel ---------------- wg 10.244.2.1/32
   route 10.244.2.0/24 proto 251 (podwire)         route 10.244.1.0/24 proto 251
veth 192.0.2.1/24, mtu 1400 ------------------- veth 192.0.2.2/24
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from pyroute2 import config as pr_config

from podwire.agent import config, keys, reconcile, wgdevice
from podwire.agent.datapath import backend as backend_mod
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.datapath import select, supervisor, userspace
from podwire.agent.netlink import links
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

# Under software emulation pyroute2's forked helper that opens a socket in a namespace can take
# longer than its 2 s default to answer.
pr_config.default_communicate_timeout = 30
pr_config.default_create_socket_timeout = 60

PORT = 51820
K_CIDR, U_CIDR = ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("10.244.2.0/24")
CLUSTER = "10.244.0.0/16"


def _desired(name: str, key: keys.PrivateKey, host: str, cidr: wgdevice.IPNetwork) -> list:
    return [
        reconcile.DesiredPeer(name, key.public_key_b64(), wgdevice.Endpoint(host, PORT), (cidr,))
    ]


def _program(backend: backend_mod.Backend, routes: routes_mod.Routes, desired: list) -> None:
    """One reconcile pass, as the agent's controller makes it."""
    backend.apply(
        reconcile.plan_changes(reconcile.plan_peers(desired, backend.read().peers, synced=True))
    )
    routes.apply(reconcile.plan_routes(desired, routes.list_routes(), synced=True))


def _link(ns: netns_mod.Netns, dev: str) -> dict:
    return json.loads(ns.ip("-d", "-j", "link", "show", "dev", dev).stdout)[0]


def main(peer_kind: str) -> dict:
    facts: dict = {"peer_kind": peer_kind}
    logs = pathlib.Path(tempfile.mkdtemp())
    with netns_mod.factory("pwk") as f:
        k, u = f.namespace("k"), f.namespace("u")
        f.veth(k, u, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24", mtu=1400)
        k.ip("route", "add", "default", "via", "192.0.2.2")
        u.ip("route", "add", "default", "via", "192.0.2.1")
        k_key, u_key = keys.PrivateKey.generate(), keys.PrivateKey.generate()
        k_dev, u_dev = f.unique("w"), f.unique("w")

        # The agent's side: what PODWIRE_DATAPATH=auto makes of this kernel.
        env = {"NODE_NAME": "k", "PODWIRE_DATAPATH": "auto", "PODWIRE_DEVICE": k_dev,
               "PODWIRE_CLUSTER_POD_CIDRS": CLUSTER, "PODWIRE_LISTEN_PORT": str(PORT)}  # fmt: skip
        cfg = config.load(environ=env)
        backend, routes = _select(cfg, k.name)
        facts["backend"] = type(backend).__name__
        facts["datapath"] = backend.datapath
        routes.install_fail_closed(cfg.cluster_pod_cidrs)
        backend.ensure_device()
        backend.set_private_key(k_key.raw)
        backend.set_listen_port(cfg.listen_port)
        links.add_address(k_dev, f"{K_CIDR.network_address + 1}/32", netns=k.name)
        facts["public_key_read_back"] = backend.read().public_key == k_key.public_key_b64()
        link = _link(k, k_dev)
        facts["link_kind"] = link.get("linkinfo", {}).get("info_kind")
        facts["mtu"] = link["mtu"]
        facts["features"] = backend.features()

        # The peer: a userspace WireGuard, programmed through its own backend.
        if peer_kind == "wireguard-go":
            command = [tools.path("wireguard-go")]
            engine_env = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        else:
            command, engine_env = list(supervisor.default_command()), {}
        peer = userspace.UserspaceBackend(
            u_dev, engine_command=command, engine_env=engine_env, netns=u.name,
            engine_log=logs / "peer.log", start_timeout=240,
        )  # fmt: skip
        # A node that runs a userspace WireGuard has /dev/net/tun; this VM has no udev to make it.
        subprocess.run(["modprobe", "tun"], check=True)
        started = time.monotonic()
        try:
            peer.ensure_device()
        except Exception as exc:
            log = (logs / "peer.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{peer_kind} did not start: {exc}\n{log}") from exc
        facts["peer_start_seconds"] = round(time.monotonic() - started, 1)
        assert peer.engine.process is not None
        f.processes.append(peer.engine.process)  # ended by PID with the namespaces
        peer.set_private_key(u_key.raw)
        peer.set_listen_port(PORT)
        links.add_address(u_dev, f"{U_CIDR.network_address + 1}/32", netns=u.name)

        to_u = _desired("u", u_key, "192.0.2.2", U_CIDR)
        _program(backend, routes, to_u)
        _program(
            peer, routes_mod.Routes(u_dev, netns=u.name), _desired("k", k_key, "192.0.2.1", K_CIDR)
        )
        facts["routes"] = [str(n) for n in routes.list_routes()]
        facts["route_show"] = k.ip("route", "show", "proto", "251").stdout
        facts["fail_closed"] = [str(n) for n in routes.list_fail_closed()]
        # Converged: a second pass has nothing to do.
        facts["second_plan_empty"] = reconcile.plan_peers(
            to_u, backend.read().peers, synced=True
        ).empty

        started = time.monotonic()
        facts["ping"] = k.ping("10.244.2.1", count=3, timeout=60)
        facts["ping_seconds"] = round(time.monotonic() - started, 1)
        facts["ping_back"] = u.ping("10.244.1.1", count=2, timeout=30)
        facts["wg_show"] = k.run("wg", "show", k_dev).stdout
        facts["wg_handshakes"] = k.run("wg", "show", k_dev, "latest-handshakes").stdout
        facts["wg_transfer"] = k.run("wg", "show", k_dev, "transfer").stdout
        facts["peer_stats"] = [
            {"public_key": s.public_key, "endpoint": str(s.endpoint),
             "allowed_ips": [str(n) for n in s.allowed_ips], "last_handshake": s.last_handshake,
             "rx_bytes": s.rx_bytes, "tx_bytes": s.tx_bytes}
            for s in backend.read().peers
        ]  # fmt: skip
        facts["peer_public_key"] = u_key.public_key_b64()
        facts["now"] = time.time()

        # An agent restarted: auto finds the same link and its peers, and traffic goes on.
        index = links.link_index(k_dev, netns=k.name)
        again, again_routes = _select(cfg, k.name)
        again.ensure_device()
        facts["restart_same_link"] = links.link_index(k_dev, netns=k.name) == index
        facts["restart_peers"] = [p.public_key for p in again.read().peers]
        facts["restart_plan_empty"] = reconcile.plan_peers(
            to_u, again.read().peers, synced=True
        ).empty
        facts["restart_ping"] = k.ping("10.244.2.1", count=2, timeout=30)

        # The peer gone (its Node deleted): peer and route removed, the pod range fails closed.
        _program(again, again_routes, [])
        facts["removed_peers"] = [p.public_key for p in again.read().peers]
        facts["removed_routes"] = [str(n) for n in again_routes.list_routes()]
        facts["removed_ping"] = k.ping("10.244.2.1", count=1, timeout=3)
        unreachable = k.run("ping", "-c", "1", "-W", "2", "10.244.2.1", check=False)
        facts["removed_ping_error"] = unreachable.stdout + unreachable.stderr
        facts["peer_log"] = (logs / "peer.log").read_text(errors="replace")[-3000:]
    return facts


def _select(cfg: config.Config, netns: str) -> tuple[backend_mod.Backend, routes_mod.Routes]:
    """What the agent's datapath component opens for this config, in the node's namespace."""
    return select.open_backend(cfg, netns=netns), routes_mod.Routes(cfg.device, netns=netns)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
