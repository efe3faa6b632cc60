"""`podwire sandbox status`: nodes, peers, handshakes, and which pod reaches which.

Read from the running sandbox each time: the WireguardNodes from the apiserver, the peers from
each node's device (`wg show DEV dump`), reachability from one ping per ordered pair of pods.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from podwire.sandbox import controlplane, kubenode, netns, operatorproc, record, tools


def collect(st: record.Record, cp: controlplane.ControlPlane) -> dict[str, Any]:
    """What `podwire sandbox status -o json` prints: enough for scripts to drive the sandbox."""
    procs = [
        {"role": p.role, "node": p.node, "pid": p.pid, "alive": p.alive()} for p in st.processes
    ]
    found = wgnodes(cp)
    nodes = []
    for n in st.nodes:
        w = found.get(n.name, {}) if found is not None else {}
        wstatus = w.get("status", {})
        conds = {c["type"]: c["status"] for c in wstatus.get("conditions", [])}
        nodes.append(
            {
                "name": n.name,
                "namespace": n.netns,
                "underlay_ip": n.underlay_ip,
                "pod_cidr": n.pod_cidr,
                "device": n.device,
                "datapath": wstatus.get("datapath"),
                "ready": conds.get("Ready") == "True",
                "public_key": w.get("spec", {}).get("publicKey"),
                "peers": peers(
                    n,
                    {k.get("spec", {}).get("publicKey"): name for name, k in (found or {}).items()},
                ),
            }
        )
    pods = [{"name": p.name, "namespace": p.netns, "ip": p.ip, "node": p.node} for p in st.pods()]
    return {
        "running": all(p["alive"] for p in procs),
        "directory": st.directory,
        "kubeconfig": st.kubeconfig,
        "apiserver": st.apiserver_url,
        "apiserver_reachable": found is not None,
        "datapath": st.datapath,
        "runtime": st.runtime,
        "tools": str(tools.BUILT),
        "processes": procs,
        "nodes": nodes,
        "pods": pods,
        "connectivity": connectivity(st),
        "operators": [dataclasses.asdict(r) for r in operatorproc.status(st)],
        "memory": kubenode.memory(st),
        "agent_pods": agent_pods(cp) if st.runtime == "kubelet" else [],
    }


def agent_pods(cp: controlplane.ControlPlane) -> list[dict[str, Any]]:
    """The chart's agent pods (the kubelet runtime): where each runs, Ready, restarts."""
    out = cp.kubectl(
        "get", "pods", "-A", "-l", "app.kubernetes.io/component=agent", "-o", "json",
        "--request-timeout=5s", check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return []
    pods = []
    for item in json.loads(out.stdout)["items"]:
        if "podwire.io/sandbox" in item["metadata"].get("labels", {}):
            continue  # the process runtime's stand-ins for token binding
        status = item.get("status", {})
        conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
        pods.append(
            {
                "name": item["metadata"]["name"],
                "node": item["spec"].get("nodeName"),
                "ready": conds.get("Ready") == "True",
                "restarts": sum(
                    c.get("restartCount", 0) for c in status.get("containerStatuses", [])
                ),
            }
        )
    return sorted(pods, key=lambda x: x["node"] or "")


def wgnodes(cp: controlplane.ControlPlane) -> dict[str, Any] | None:
    """The WireguardNodes by name; None when the apiserver does not answer."""
    try:
        out = cp.kubectl("get", "wgnodes", "-o", "json", "--request-timeout=5s", check=False)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    return {i["metadata"]["name"]: i for i in json.loads(out.stdout)["items"]}


def is_ready(wgnode: dict[str, Any]) -> bool:
    conds = wgnode.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def peers(node: record.Node, names: dict[str | None, str]) -> list[dict[str, Any]]:
    """The device's peers as `wg show DEV dump` gives them, named by their WireguardNode."""
    # A real node's UAPI sockets are in its own /run: wg must see its mount namespace too.
    enter = (
        ["nsenter", f"--target={node.mounts_pid}", "--mount", "--net"]
        if node.mounts_pid
        else ["ip", "netns", "exec", node.netns]
    )
    out = subprocess.run(
        [*enter, tools.path("wg"), "show", node.device, "dump"],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    peers = []
    for line in out.stdout.strip().splitlines()[1:]:
        f = line.split("\t")
        if len(f) < 8:
            continue
        handshake = int(f[4])
        peers.append(
            {
                "node": names.get(f[0]),
                "public_key": f[0],
                "endpoint": None if f[2] == "(none)" else f[2],
                "allowed_ips": f[3].split(","),
                "latest_handshake": handshake or None,
                "rx_bytes": int(f[5]),
                "tx_bytes": int(f[6]),
            }
        )
    return peers


def connectivity(st: record.Record, *, timeout: float = 2) -> list[dict[str, Any]]:
    """One ping for every ordered pair of pods, in parallel: who reaches whom."""
    pods = st.pods()
    pairs = [(a, b) for a in pods for b in pods if a is not b]

    def probe(pair: tuple[record.Pod, record.Pod]) -> dict[str, Any]:
        a, b = pair
        ok = netns.Netns(a.netns).ping(b.ip, count=1, timeout=timeout)
        return {"from": a.name, "to": b.name, "ok": ok}

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(probe, pairs))


def render(status: dict[str, Any], *, as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        print(json.dumps(status, indent=2), file=out)
        return
    if "kubeconfig" not in status:
        print(f"no sandbox in {status['directory']}", file=out)
        return
    p = _printer(out)
    dead = [
        f"{x['role']}{' ' + x['node'] if x['node'] else ''}"
        for x in status["processes"]
        if not x["alive"]
    ]
    p(
        f"sandbox:    {status['directory']} ({'running' if not dead else 'NOT running: ' + ', '.join(dead)})"
    )
    p(f"kubeconfig: {status['kubeconfig']}")
    if status.get("runtime") == "kubelet":
        p("runtime:    kubelet (real nodes: containerd and a kubelet each, podwire by helm)")
    mem = status.get("memory") or {}
    if mem:
        images = mem.get("containerd_tmpfs_mib", 0)
        p(
            f"memory:     {mem.get('processes_rss_mib', 0)} MiB resident in its processes"
            + (f", {images} MiB of images in its nodes' containerd (tmpfs)" if images else "")
        )
    p(
        f"apiserver:  {status['apiserver']}{'' if status['apiserver_reachable'] else ' (not answering)'}"
    )
    p("")
    rows = [["NODE", "NAMESPACE", "UNDERLAY", "POD CIDR", "DATAPATH", "READY", "PEERS"]]
    for n in status["nodes"]:
        rows.append(
            [
                n["name"],
                n["namespace"],
                n["underlay_ip"],
                n["pod_cidr"],
                n["datapath"] or "-",
                "yes" if n["ready"] else "no",
                str(len(n["peers"])),
            ]
        )
    p(_table(rows))
    p("")
    if status.get("agent_pods"):
        rows = [["AGENT POD", "NODE", "READY", "RESTARTS"]]
        for a in status["agent_pods"]:
            rows.append([a["name"], a["node"], "yes" if a["ready"] else "no", str(a["restarts"])])
        p(_table(rows))
        p("")
    if status.get("operators"):
        rows = [["OPERATOR", "PID", "ALIVE", "LEADER", "READY", "METRICS"]]
        for o in status["operators"]:
            rows.append(
                [
                    o["identity"],
                    str(o["pid"]),
                    "yes" if o["alive"] else "no",
                    "yes" if o["leader"] else "no",
                    "yes" if o["ready"] else "no",
                    f"127.0.0.1:{o['metrics_port']}",
                ]
            )
        p(_table(rows))
        p("")
    rows = [["NODE", "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX"]]
    now = time.time()
    for n in status["nodes"]:
        for peer in n["peers"]:
            hs = peer["latest_handshake"]
            rows.append(
                [
                    n["name"],
                    peer["node"] or peer["public_key"][:12],
                    peer["endpoint"] or "-",
                    f"{int(now - hs)}s ago" if hs else "never",
                    str(peer["rx_bytes"]),
                    str(peer["tx_bytes"]),
                ]
            )
    p(_table(rows))
    p("")
    pods = [x["name"] for x in status["pods"]]
    ok = {(c["from"], c["to"]): c["ok"] for c in status["connectivity"]}
    rows = [["FROM \\ TO", *pods]]
    for a in pods:
        rows.append([a, *("-" if a == b else ("ok" if ok.get((a, b)) else "FAIL") for b in pods)])
    p(_table(rows))
    reached = sum(1 for c in status["connectivity"] if c["ok"])
    p(f"{reached}/{len(status['connectivity'])} pod pairs reachable")  # fmt: skip


def _printer(out: TextIO) -> Callable[[str], None]:
    return lambda line: print(line, file=out)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
