"""bench/throughput: podwire's engine against the WireGuard implementations it must keep up with.

Two namespaces over a veth pair; a tunnel between them made of the same implementation on both
sides, or podwire-engine facing upstream wireguard-go:

    ns a  wg 10.99.0.1/24 ==== tunnel ==== wg 10.99.0.2/24  ns b
          veth 192.0.2.1/24 ----------- veth 192.0.2.2/24

For each case, each measurement --runs times (median reported): one TCP stream a->b and b->a
(iperf3, --seconds), four streams a->b, iperf3's retransmits on the single stream, 64-byte UDP
packets per second received, and CPU seconds per GB of the two tunnel processes with their RSS
before the first and after the last run. The idle round trip (30 pings 50 ms apart) is taken
at the end with every case's tunnel up at once, pinged in turn for --rtt-rounds rounds (median
of the rounds' averages), so its ratios compare the same moments; each case's own ping before
its streams is kept in the JSON as ping_alone_ms. Ratios are to upstream wireguard-go in the
same run; the table goes to stdout and all figures to --json.
With --soak N the engine pair carries one stream for N seconds, RSS read before and after.

Every process (iperf3, the tunnels) runs in namespaces the run creates; the kernel's socket
buffer limits are those of a fresh namespace for every case, and every tunnel forces its own
buffer sizes (SO_RCVBUFFORCE) as wireguard-go does, so no global setting is touched.
boringtun is built by bench/boringtun.sh (cargo, crates.io) when missing; if that fails the
table says so and goes on without it.

Usage (root): .venv/bin/python bench/throughput.py [--seconds 10] [--runs 3] [--cases a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import shipped  # bench/ is the script's directory

from podwire.sandbox import netns, supervisor, tools

ROOT = pathlib.Path(__file__).resolve().parents[1]
BORINGTUN = ROOT / ".cache" / "tools" / "bin" / "boringtun-cli"
ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "WG_SUDO": "1"}
BASE = "wireguard-go"
CASES: dict[str, tuple[str | None, str | None]] = {
    "bare veth": (None, None),
    "debian-wireguard-go": ("debian", "debian"),
    "wireguard-go": ("wggo", "wggo"),
    "boringtun": ("boringtun", "boringtun"),
    "engine <-> engine": ("engine", "engine"),
    "engine (pure Python)": ("engine-python", "engine-python"),
    "engine (offloads off)": ("engine-plain", "engine-plain"),
    "engine (dev venv's Python)": ("engine-devpy", "engine-devpy"),
    "engine -> wireguard-go": ("engine", "wggo"),
    "engine (pure Python) -> wireguard-go": ("engine-python", "wggo"),
}
# "engine -> wireguard-go" is both directions: a->b is the engine sending, the reverse column
# wireguard-go sending to the engine. "engine (offloads off)" is the engine as it was before
# them (PODWIRE_ENGINE_OFFLOADS=off), one packet per system call. The engine runs its native
# fast path (agent/engine/native) where it is built; "(pure Python)" is the same engine with
# PODWIRE_ENGINE_NATIVE=off. Every engine runs as the image ships it, on Debian's python3
# (bench/shipped.py), except "(dev venv's Python)": the same code on the interpreter of .venv.
CLK_TCK = os.sysconf("SC_CLK_TCK")
Tunnel = tuple[netns.NetnsFactory, netns.Netns, netns.Netns, str, list[int]]


@functools.cache
def shipped_engine() -> str:
    """The engine under Debian's python3, installed from this tree once per run."""
    return shipped.engine()


def command(kind: str, dev: str) -> list[str]:
    if kind == "engine-devpy":
        return [shipped.DEV_ENGINE, "-f", dev]
    if kind.startswith("engine"):
        return [shipped_engine(), "-f", dev]
    if kind == "wggo":
        return [tools.path("wireguard-go"), "-f", dev]
    if kind == "debian":
        return [tools.debian_wireguard_go(), "-f", dev]
    return [str(BORINGTUN), "-f", "--disable-drop-privileges", dev]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        match = re.search(r"VmRSS:\s+(\d+)", pathlib.Path(f"/proc/{pid}/status").read_text())
        total += int(match.group(1)) if match else 0
    return total / 1024


def iperf(t: Tunnel, *extra: str, seconds: int) -> dict[str, object]:
    """One iperf3 client run from a to b; its JSON."""
    f, a, b, server_ip, _ = t
    server = f.spawn(b, ["iperf3", "-s", "-1", "-B", server_ip])
    try:
        supervisor.wait_until(
            lambda: ":5201" in b.run("ss", "-ltn", check=False).stdout, timeout=10, what="iperf3"
        )
        out = a.run(
            "iperf3", "-c", server_ip, "-t", str(seconds), "-J", *extra, timeout=seconds + 40
        )
        result: dict[str, object] = json.loads(out.stdout)
        return result
    finally:
        supervisor.stop(server)


def tcp(t: Tunnel, seconds: int, *extra: str) -> tuple[float, int, float]:
    """(Gbit/s received, retransmits, CPU seconds per GB of the tunnel processes)."""
    before = cpu_seconds(t[4]) if t[4] else 0.0
    end = iperf(t, *extra, seconds=seconds)["end"]
    assert isinstance(end, dict)
    received, sent = end["sum_received"], end["sum_sent"]
    cpu = (cpu_seconds(t[4]) - before) if t[4] else 0.0
    gigabytes = received["bytes"] / 1e9
    return (
        received["bits_per_second"] / 1e9,
        int(sent.get("retransmits", 0)),
        cpu / gigabytes if gigabytes else 0.0,
    )


def udp_pps(t: Tunnel, seconds: int) -> float:
    end = iperf(t, "-u", "-l", "64", "-b", "0", seconds=seconds)["end"]
    assert isinstance(end, dict)
    s = end.get("sum_received") or end["sum"]
    packets = s.get("packets", 0) - s.get("lost_packets", 0)
    return packets / max(s.get("seconds", seconds), 1e-9)


def ping_ms(t: Tunnel, count: int = 30, interval: float = 0.05) -> float:
    """The average round trip of count pings through the tunnel, interval seconds apart."""
    _, a, _, server_ip, _ = t
    out = a.run(
        "ping", "-n", "-q", "-c", str(count), "-i", str(interval), server_ip, check=False,
        timeout=30 + count * interval * 2,
    ).stdout  # fmt: skip
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(match.group(1)) if match else float("nan")


def interleaved_pings(
    names: list[str], rounds: int, count: int, interval: float, workdir: pathlib.Path
) -> dict[str, list[float]]:
    """Every named case's tunnel up at once, each in namespaces of its own, pinged in turn,
    round after round: each case's average per round. An idle tunnel's round trip drifts with
    the machine (wireguard-go's alone by 0.39-0.49 ms within an hour here), so ratios taken
    from cases measured minutes apart say more about the minutes than the tunnels; these
    compare the same moments."""
    figures: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as up:
        tunnels = {}
        for i, name in enumerate(names):
            f = up.enter_context(netns.factory(prefix=f"pr{i}"))
            tunnels[name] = tunnel(f, CASES[name], workdir)
        for _ in range(rounds):
            for name, t in tunnels.items():
                figures[name].append(ping_ms(t, count, interval))
    return figures


def tunnel(
    f: netns.NetnsFactory, kinds: tuple[str | None, str | None], workdir: pathlib.Path
) -> Tunnel:
    a, b = f.namespace("a"), f.namespace("b")
    f.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    if kinds == (None, None):
        return f, a, b, "192.0.2.2", []
    keys = [tools.wg_keypair(), tools.wg_keypair()]
    pids = []
    for i, (ns, kind) in enumerate(zip((a, b), kinds, strict=True)):
        assert kind is not None
        dev = f.unique("w")
        env = {
            **ENV,
            "PODWIRE_ENGINE_OFFLOADS": "off" if kind == "engine-plain" else "on",
            "PODWIRE_ENGINE_NATIVE": "off" if kind == "engine-python" else "on",
        }
        proc = f.spawn(ns, command(kind, dev), log_path=workdir / f"{dev}.log", env=env)
        pids.append(proc.pid)
        sock = pathlib.Path(f"/var/run/wireguard/{dev}.sock")
        supervisor.wait_until(
            lambda s=sock, n=ns, d=dev: s.exists() and n.link_exists(d), timeout=30, what=dev
        )
        peer = 1 - i
        with tools.private_key_file(workdir / f"{dev}.key", keys[i][0]) as keyfile:
            ns.run(
                "wg", "set", dev, "private-key", str(keyfile), "listen-port", "51820",
                "peer", keys[peer][1], "endpoint", f"192.0.2.{peer + 1}:51820",
                "allowed-ips", "10.99.0.0/24",
            )  # fmt: skip
        ns.ip("addr", "add", f"10.99.0.{i + 1}/24", "dev", dev)
        ns.ip("link", "set", dev, "up")
    if not a.ping("10.99.0.2", count=3, timeout=10):
        raise RuntimeError(f"{kinds}: no tunnel")
    return f, a, b, "10.99.0.2", pids


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(
    kinds: tuple[str | None, str | None], seconds: int, runs: int, workdir: pathlib.Path
) -> dict[str, float]:
    with netns.factory(prefix="pwb") as f:
        t = tunnel(f, kinds, workdir)
        rss_before = rss_mib(t[4])
        fwd, rev, four, retrans, cpu, pps, rtt = [], [], [], [], [], [], []
        # Idle, before any load: a backlog a flood leaves in the 7 MiB buffers (seconds of
        # 64-byte packets for a Python engine) would count as latency.
        # Kept as ping_alone_ms; the table's round trip is measured interleaved (main).
        rtt = [ping_ms(t) for _ in range(runs)]
        for _ in range(runs):
            gbps, retransmits, cpu_per_gb = tcp(t, seconds)
            fwd.append(gbps)
            retrans.append(float(retransmits))
            cpu.append(cpu_per_gb)
            rev.append(tcp(t, seconds, "-R")[0])
            four.append(tcp(t, seconds, "-P", "4")[0])
            pps.append(udp_pps(t, seconds))
        return {
            "tcp1_gbps": median(fwd),
            "tcp1_reverse_gbps": median(rev),
            "tcp4_gbps": median(four),
            "retransmits": median(retrans),
            "ping_ms": median(rtt),
            "ping_alone_ms": median(rtt),
            "udp64_kpps": median(pps) / 1e3,
            "cpu_s_per_gb": median(cpu),
            "rss_mib_before": rss_before,
            "rss_mib_after": rss_mib(t[4]),
            "runs": {"tcp1_gbps": fwd, "tcp1_reverse_gbps": rev, "tcp4_gbps": four},  # type: ignore[dict-item]
        }


def soak(seconds: int, workdir: pathlib.Path) -> dict[str, float]:
    """One engine-to-engine stream for seconds: the engines' RSS before and after."""
    with netns.factory(prefix="pwb") as f:
        t = tunnel(f, ("engine", "engine"), workdir)
        before = rss_mib(t[4])
        gbps = tcp(t, seconds)[0]
        return {"seconds": seconds, "gbps": gbps, "rss_mib_before": before, "rss_mib_after": rss_mib(t[4])}  # fmt: skip


def setup_boringtun() -> str:
    """'' when boringtun is there (built now if it was missing), else why not."""
    if BORINGTUN.exists():
        return ""
    print("building boringtun-cli (cargo install, once) ...", file=sys.stderr)
    proc = subprocess.run([str(ROOT / "bench" / "boringtun.sh")], capture_output=True, text=True)
    if proc.returncode != 0 or not BORINGTUN.exists():
        return "cargo install boringtun-cli failed: " + proc.stderr.strip().splitlines()[-1:][0]
    return ""


COLUMNS: list[tuple[str, str, Callable[[float], str]]] = [
    ("tcp1_gbps", "1 TCP Gb/s", lambda v: f"{v:.2f}"),
    ("tcp1_reverse_gbps", "reverse", lambda v: f"{v:.2f}"),
    ("tcp4_gbps", "4 TCP Gb/s", lambda v: f"{v:.2f}"),
    ("retransmits", "retrans", lambda v: f"{v:.0f}"),
    ("ping_ms", "ping ms", lambda v: f"{v:.3f}"),
    ("udp64_kpps", "64B kpps", lambda v: f"{v:.0f}"),
    ("cpu_s_per_gb", "CPU s/GB", lambda v: f"{v:.2f}"),
    ("rss_mib_before", "RSS MiB", lambda v: f"{v:.0f}"),
    ("rss_mib_after", "after", lambda v: f"{v:.0f}"),
]


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get(BASE, {})
    lines = [f"{'case':<26}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)]
    for name, r in results.items():
        lines.append(f"{name:<26}" + "".join(f"{fmt(r[key]):>12}" for key, _, fmt in COLUMNS))
        if base and name != BASE:
            ratios = [r[key] / base[key] if base.get(key) else float("nan") for key, *_ in COLUMNS]
            lines.append(f"{'  ratio to ' + BASE:<26}" + "".join(f"{x:>12.2f}" for x in ratios[:7]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--soak", type=int, default=0, help="seconds of one engine stream for RSS")
    p.add_argument(
        "--rtt-rounds", type=int, default=6, help="rounds of interleaved pings (0: each case alone)"
    )
    p.add_argument("--json", default="", help="where to write the figures (default: a temp file)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="podwire-bench-"))
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are {list(CASES)}")
    skipped: dict[str, str] = {}
    if "boringtun" in names:
        why = setup_boringtun()
        if why:
            skipped["boringtun"] = why
    results: dict[str, dict[str, float]] = {}
    started = time.time()
    for name in names:
        if name in skipped:
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = measure(CASES[name], args.seconds, args.runs, workdir)
        except (RuntimeError, tools.ToolMissing, subprocess.SubprocessError) as exc:
            skipped[name] = str(exc)
    if args.rtt_rounds and results:
        print("round trips, every tunnel up, pinged in turn ...", file=sys.stderr, flush=True)
        try:
            pings = interleaved_pings(list(results), args.rtt_rounds, 30, 0.05, workdir)
        except (RuntimeError, tools.ToolMissing, subprocess.SubprocessError) as exc:
            print(f"interleaved round trips not measured ({exc}); each case's own ping stands")
        else:
            for name, values in pings.items():
                results[name]["ping_ms"] = median(values)
                results[name]["runs"]["ping_ms"] = values  # type: ignore[index]
    report: dict[str, object] = {
        "engine_python": shipped.versions(),
        "seconds": args.seconds,
        "rtt_rounds": args.rtt_rounds,
        "runs": args.runs,
        "results": results,
        "skipped": skipped,
        "wall_seconds": round(time.time() - started),
    }
    if args.soak:
        report["soak"] = soak(args.soak, workdir)
    print(table(results))
    print("engine interpreters:", json.dumps(report["engine_python"]))
    for name, why in skipped.items():
        print(f"{name}: not measured ({why})")
    if "soak" in report:
        print("soak:", json.dumps(report["soak"]))
    out = pathlib.Path(args.json) if args.json else workdir / "throughput.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
