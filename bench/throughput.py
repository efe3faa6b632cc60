"""bench/throughput: TCP throughput through podwire's engine, against its baselines.

Two namespaces over a veth pair; iperf3 runs one TCP stream for --seconds each way through:
the bare veth (the ceiling), upstream wireguard-go on both sides (the userspace baseline),
podwire-engine on both sides, and podwire-engine facing wireguard-go. Every figure is printed
with its ratio to wireguard-go measured in the same run.

    ns a  wg 10.99.0.1/24 ==== tunnel ==== wg 10.99.0.2/24  ns b
          veth 192.0.2.1/24 ----------- veth 192.0.2.2/24

Usage (root): .venv/bin/python bench/throughput.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import sys
import tempfile

from podwire.sandbox import netns, supervisor, tools

ENGINE = str(pathlib.Path(sys.executable).parent / "podwire-engine")
ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


def _iperf(
    f: netns.NetnsFactory,
    a: netns.Netns,
    b: netns.Netns,
    server_ip: str,
    seconds: int,
    reverse: bool,
) -> float:
    server = f.spawn(b, ["iperf3", "-s", "-1", "-B", server_ip])
    try:
        supervisor.wait_until(
            lambda: b.run("ss", "-ltn", check=False).stdout.count(":5201") > 0,
            timeout=10,
            what="iperf3",
        )
        args = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
        out = a.run(*args, timeout=seconds + 30)
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        supervisor.stop(server)


def measure(
    kinds: tuple[str | None, str | None], seconds: int, workdir: pathlib.Path
) -> tuple[float, float]:
    with netns.factory(prefix="pwb") as f:
        a, b = f.namespace("a"), f.namespace("b")
        f.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
        if kinds == (None, None):
            return _iperf(f, a, b, "192.0.2.2", seconds, False), _iperf(
                f, a, b, "192.0.2.2", seconds, True
            )
        keys = [tools.wg_keypair(), tools.wg_keypair()]
        for i, (ns, kind) in enumerate(zip((a, b), kinds, strict=True)):
            dev = f.unique("w")
            binary = ENGINE if kind == "engine" else tools.path("wireguard-go")
            f.spawn(ns, [binary, "-f", dev], log_path=workdir / f"{dev}.log", env=ENV)
            sock = pathlib.Path(f"/var/run/wireguard/{dev}.sock")
            supervisor.wait_until(
                lambda s=sock, n=ns, d=dev: s.exists() and n.link_exists(d), timeout=20, what=dev
            )
            keyfile = workdir / f"{dev}.key"
            keyfile.write_text(keys[i][0] + "\n")
            keyfile.chmod(0o600)
            peer = 1 - i
            ns.run(
                "wg", "set", dev, "private-key", str(keyfile), "listen-port", "51820", "peer", keys[peer][1],
                "endpoint", f"192.0.2.{peer + 1}:51820", "allowed-ips", "10.99.0.0/24",
            )  # fmt: skip
            ns.ip("addr", "add", f"10.99.0.{i + 1}/24", "dev", dev)
            ns.ip("link", "set", dev, "up")
        if not a.ping("10.99.0.2", count=3, timeout=10):
            raise SystemExit(f"{kinds}: no tunnel")
        return _iperf(f, a, b, "10.99.0.2", seconds, False), _iperf(
            f, a, b, "10.99.0.2", seconds, True
        )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="podwire-bench-"))
    cases = {
        "bare veth": (None, None),
        "wireguard-go <-> wireguard-go": ("wggo", "wggo"),
        "engine <-> engine": ("engine", "engine"),
        "engine <-> wireguard-go": ("engine", "wggo"),
    }
    results = {name: measure(kinds, args.seconds, workdir) for name, kinds in cases.items()}
    base = results["wireguard-go <-> wireguard-go"]
    print(f"\n{'path':<32}{'a->b Gbit/s':>12}{'b->a Gbit/s':>12}{'ratio to wireguard-go':>24}")
    for name, (fwd, rev) in results.items():
        print(f"{name:<32}{fwd:>12.3f}{rev:>12.3f}{fwd / base[0]:>12.2f}{rev / base[1]:>12.2f}")
    print(json.dumps({k: {"forward_gbps": v[0], "reverse_gbps": v[1]} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
