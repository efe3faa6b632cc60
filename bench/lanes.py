"""bench/lanes: what lanes buy between two nodes on the userspace engine, lanes 1 against 2.

Two namespaces over a veth pair, each side built as the agent builds it with `lanes: N`
(select.open_backend and open_lane: one podwire-engine per lane in child mode, each its own
device, key and port; routes multipath over the lanes with the layer-4 hash; peers from
reconcile.lane_peers), and 4 TCP streams (iperf3 -P 4) between the two "pods":

    ns a  lo 10.99.1.1/32                               lo 10.99.2.1/32  ns b
          wa, wa_1 ... (one engine each) === lanes === wb, wb_1 ...
          veth 192.0.2.1/24 ------------------------- veth 192.0.2.2/24

Each lane count is measured --runs times, alternating (1, 2, 1, 2, ...) so a busy neighbour
costs both alike; the medians and their ratio are printed and written to --json, with the
engines' CPU seconds per GB. Every process runs in namespaces the run creates and is ended by
PID with them; the multipath hash is a setting of those namespaces, gone with them.

Both nodes share this machine's cores: one lane already keeps an engine busy on each side, so
lanes add throughput only where cores are left over (on a real node, the receive side's own).
Measured 2026-11-30 on the 2-core machine, shared, --seconds 8 --runs 2: lanes 1 1.40 Gbit/s,
lanes 2 1.47 Gbit/s (ratio 1.05), 9.1 and 9.3 CPU s/GB: the engines' CPU, not one flow, is
the limit here.

Usage (root): .venv/bin/python bench/lanes.py [--seconds 10] [--runs 3] [--lanes 1,2]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import pathlib
import statistics
import sys
import tempfile

from throughput import cpu_seconds  # the sibling benchmark's reading of /proc

from podwire.agent import config, keys, reconcile, wgdevice
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.datapath import select, userspace
from podwire.agent.netlink import multipath
from podwire.sandbox import netns, supervisor

PORT = 51820
POD = {"a": "10.99.1.1", "b": "10.99.2.1"}
CIDR = {"a": "10.99.1.0/24", "b": "10.99.2.0/24"}
UNDERLAY = {"a": "192.0.2.1", "b": "192.0.2.2"}


class Side:
    """One node with `lanes` lanes, as the agent brings it up."""

    def __init__(
        self, f: netns.NetnsFactory, name: str, ns: netns.Netns, lanes: int, workdir: pathlib.Path
    ) -> None:
        self.name, self.ns = name, ns
        device = f.unique("w")
        self.cfg = config.Config(
            node_name=name,
            key_path=workdir / f"{device}.key",
            datapath="userspace",
            device=device,
            listen_port=PORT,
            fail_closed=False,
            strict_mode=False,
            lanes=lanes,
        )
        self.keys = [keys.PrivateKey.generate() for _ in range(lanes)]
        under = UNDERLAY[name]
        self.backends = [select.open_backend(self.cfg, netns=ns.name, underlay_address=under)]
        self.backends += [
            select.open_lane(
                self.cfg, i, datapath="userspace", netns=ns.name, underlay_address=under
            )
            for i in range(1, lanes)
        ]
        self.pids: list[int] = []
        for lane, backend in enumerate(self.backends):
            backend.ensure_device()
            assert isinstance(backend, userspace.UserspaceBackend)
            assert backend.engine.process is not None
            f.processes.append(backend.engine.process)  # ended by PID with the namespaces
            self.pids.append(backend.engine.process.pid)
            backend.set_private_key(self.keys[lane].raw)
            backend.set_listen_port(self.cfg.lane_port(lane))
        self.devices = [self.cfg.lane_device(i) for i in range(lanes)]
        self.routes = routes_mod.Routes(device, netns=ns.name, devices=self.devices)
        multipath.hash_by_flow(netns=ns.name)
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

    def program(self, peer: reconcile.DesiredPeer) -> None:
        for lane, backend in enumerate(self.backends):
            want = reconcile.lane_peers([peer], lane)
            backend.apply(
                reconcile.plan_changes(
                    reconcile.plan_peers(want, backend.read().peers, synced=True)
                )
            )
        paths = reconcile.desired_paths([peer], len(self.backends))
        self.routes.apply_paths(reconcile.plan_paths(paths, self.routes.list_paths(), synced=True))


def one_run(lanes: int, seconds: int, workdir: pathlib.Path) -> dict[str, float]:
    """Gbit/s of iperf3 -P 4 from a's pod address to b's, and the engines' CPU s per GB."""
    with netns.factory("pwb") as f:
        a_ns, b_ns = f.namespace("a"), f.namespace("b")
        f.veth(a_ns, b_ns, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
        a, b = Side(f, "a", a_ns, lanes, workdir), Side(f, "b", b_ns, lanes, workdir)
        a.program(b.as_peer())
        b.program(a.as_peer())
        ping = a_ns.run("ping", "-n", "-q", "-c", "3", "-I", POD["a"], "-w", "20", POD["b"], check=False)  # fmt: skip
        if ping.returncode != 0:
            raise RuntimeError(f"lanes {lanes}: no tunnel\n{ping.stdout}")
        server = f.spawn(b_ns, ["iperf3", "-s", "-1", "-B", POD["b"]])
        try:
            supervisor.wait_until(
                lambda: ":5201" in b_ns.run("ss", "-ltn", check=False).stdout,
                timeout=10,
                what="iperf3",
            )
            pids = a.pids + b.pids
            before = cpu_seconds(pids)
            out = a_ns.run(
                "iperf3", "-c", POD["b"], "-B", POD["a"], "-P", "4", "-t", str(seconds), "-J",
                timeout=seconds + 60,
            )  # fmt: skip
            cpu = cpu_seconds(pids) - before
        finally:
            supervisor.stop(server)
        end = json.loads(out.stdout)["end"]["sum_received"]
        gigabytes = end["bytes"] / 1e9
        return {
            "gbit_per_s": end["bits_per_second"] / 1e9,
            "cpu_s_per_gb": cpu / gigabytes if gigabytes else float("nan"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--lanes", default="1,2", help="lane counts to compare, the first is the base"
    )
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    counts = [int(x) for x in args.lanes.split(",")]
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for n in counts:
                got = one_run(n, args.seconds, pathlib.Path(tmp))
                results[n].append(got)
                print(f"run {run + 1}, lanes {n}: {got['gbit_per_s']:.3f} Gbit/s, "
                      f"{got['cpu_s_per_gb']:.1f} CPU s/GB", file=sys.stderr)  # fmt: skip
    base = statistics.median(r["gbit_per_s"] for r in results[counts[0]])
    summary = {}
    print(f"{'lanes':>5}  {'Gbit/s (median)':>15}  {'CPU s/GB':>8}  {'ratio':>5}")
    for n in counts:
        rate = statistics.median(r["gbit_per_s"] for r in results[n])
        cpu = statistics.median(r["cpu_s_per_gb"] for r in results[n])
        summary[n] = {
            "gbit_per_s": rate,
            "cpu_s_per_gb": cpu,
            "ratio": rate / base,
            "runs": results[n],
        }
        print(f"{n:>5}  {rate:>15.3f}  {cpu:>8.1f}  {rate / base:>5.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
