"""bench/control_plane: one agent against a cluster of N nodes, against its baseline.

Fills the real apiserver with N Nodes and N WireguardNodes, starts one podwire-agent in a node
namespace and measures: the time from the agent's start to its device holding all N peers and
its node routing their N pod CIDRs through it; the time from one new node's WireguardNode being
published to its peer and route being in place; and the agent's resident memory. It runs twice
in the same run: with podwire's engine as the device, and with upstream wireguard-go as the
device (the baseline), and prints each figure with the ratio between the two.

Targets (issue 4): full sync of 5,000 within 15 s, one change within 1 s, under 250 MB.

Usage (root): .venv/bin/python bench/control_plane.py [--nodes 5000]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import pathlib
import signal
import sys
import tempfile
import time

import kubernetes
from cryptography.hazmat.primitives.asymmetric import x25519

from podwire.sandbox import controlplane, netns, tools, topology


def _key() -> str:
    return base64.b64encode(
        x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    ).decode()


BENCH_PODS = "10.64.0.0/10"  # holds every node's pod CIDR up to 16,384 nodes


def populate(cp: controlplane.ControlPlane, n: int) -> None:
    api = kubernetes.config.new_client_from_config(config_file=str(cp.kubeconfig))
    api.configuration.connection_pool_maxsize = 16
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)

    def one(i: int) -> None:
        name = f"bench-{i:05d}"
        ip = f"172.31.{i // 250}.{i % 250 + 1}"  # only data in the apiserver: nothing is sent there
        cidr = f"10.{64 + i // 256}.{i % 256}.0/24"
        core.create_node(
            {"metadata": {"name": name}, "spec": {"podCIDRs": [cidr], "podCIDR": cidr}}
        )
        core.patch_node_status(
            name, {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
        )
        custom.create_cluster_custom_object(
            "podwire.io", "v1alpha1", "wgnodes",
            {"apiVersion": "podwire.io/v1alpha1", "kind": "WireguardNode", "metadata": {"name": name},
             "spec": {"publicKey": _key(), "listenPort": 51871}},
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


def peer_count(ns: netns.Netns, device: str) -> int:
    proc = ns.run("wg", "show", device, "peers", check=False, timeout=60)
    return len(proc.stdout.split()) if proc.returncode == 0 else 0


def route_count(ns: netns.Netns, device: str) -> int:
    # Every table: with strictMode (the default) the peers' routes live in podwire's own.
    proc = ns.run(
        "ip", "-4", "route", "show", "table", "all", "dev", device, "proto", "251", check=False
    )
    return len(proc.stdout.splitlines()) if proc.returncode == 0 else 0


def programmed(ns: netns.Netns, device: str, n: int) -> bool:
    """The device holds n peers and the node routes each one's pod CIDR through it."""
    return peer_count(ns, device) >= n and route_count(ns, device) >= n


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_once(
    cp: controlplane.ControlPlane, workdir: pathlib.Path, n: int, engine: str | None, tag: str
) -> dict[str, float]:
    with netns.factory() as factory:
        cluster = topology.Cluster(factory, cp, workdir / tag)
        node = cluster.add_node(f"agent-{tag}", index=1, pods=0)
        env = {"PODWIRE_ENGINE": engine} if engine else {}
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        # The benchmark's pod CIDRs (10.64.0.0 up) and the node's own must lie inside the
        # cluster's, or the agent refuses them.
        env["PODWIRE_CLUSTER_POD_CIDRS"] = f"{BENCH_PODS},{topology.POD_SUPERNET}"
        started = time.monotonic()
        agent = cluster.start_agent(node, env=env)
        deadline = started + 600
        while not programmed(node.ns, node.device, n):
            if time.monotonic() > deadline or not agent.alive():
                raise SystemExit(
                    f"{tag}: the device never reached {n} peers; see {node.workdir / 'agent.log'}"
                )
            time.sleep(0.2)
        full_sync = time.monotonic() - started

        name = f"bench-new-{tag}"
        t0 = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": ["10.127.255.0/24"]}}))  # fmt: skip
        cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                   json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.1"}]}}))  # fmt: skip
        t_obj = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "podwire.io/v1alpha1", "kind": "WireguardNode", "metadata": {"name": name},
             "spec": {"publicKey": _key(), "listenPort": 51871}}))  # fmt: skip
        t_pub = time.monotonic()
        while not programmed(node.ns, node.device, n + 1):
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"{tag}: the new node was never programmed")
            time.sleep(0.05)
        one_change = time.monotonic() - t_pub
        del t_obj
        mem = rss_mb(agent.pid)
        cp.kubectl("delete", "node", name, "--wait=false")
        cp.kubectl("delete", "wgnode", name, "--wait=false")
        cp.kubectl("delete", "wgnode", node.name, "--wait=false", check=False)
        cp.kubectl("delete", "node", node.name, "--wait=false", check=False)
        return {"full_sync_s": full_sync, "one_change_s": one_change, "agent_rss_mb": mem}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=5000)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/control_plane needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like an exception, so the apiserver, etcd and namespaces are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="podwire-bench-"))
    cp = controlplane.ControlPlane(workdir / "cp")
    cp.start()
    try:
        cp.install_crds()
        t0 = time.monotonic()
        populate(cp, args.nodes)
        print(
            f"populated {args.nodes} Nodes and WireguardNodes in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
        ours = run_once(cp, workdir, args.nodes, None, "engine")
        base = run_once(cp, workdir, args.nodes, tools.path("wireguard-go"), "wggo")
    finally:
        cp.stop()
    print(f"\n{'figure':<16}{'podwire-engine':>16}{'wireguard-go':>16}{'ratio':>8}   target")
    targets = {"full_sync_s": "< 15 s", "one_change_s": "< 1 s", "agent_rss_mb": "< 250 MB"}
    for k, target in targets.items():
        print(f"{k:<16}{ours[k]:>16.2f}{base[k]:>16.2f}{ours[k] / base[k]:>8.2f}   {target}")
    print(json.dumps({"nodes": args.nodes, "podwire_engine": ours, "wireguard_go": base}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
