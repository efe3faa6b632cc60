"""bench/handshake_flood: a handshake flood against podwire-engine and wireguard-go, in one run.

The responder (ns b) takes a flood of initiations with a valid mac1 (they need only its public
key, which every WireguardNode publishes) from a hundred source addresses, sent by one process
as fast as it can go, while the legitimate peer (ns a) loses its session, handshakes again and
then carries a TCP stream (iperf3). Three responders take it in turn: wireguard-go, the engine
with one socket for data and flood alike (PODWIRE_ENGINE_STEERING=off: the engine before the
kernel steered for it), and the engine as it runs. For each, the same figures:

- the flood's rate (initiations a second that left the sender);
- the time from the legitimate peer's first packet to its completed handshake;
- the stream's throughput during the flood, as a share of its throughput without it;
- the responder's CPU (seconds of CPU per second) during the flood.

    ns a  wg 10.98.0.1/24 ==== tunnel ==== wg 10.98.0.2/24  ns b  <==== ns f: 100 sources
          veth 192.0.2.1/24 ----------- veth 192.0.2.2/24
                                        veth 198.51.100.254/24 ---- veth 198.51.100.1-100/24

Everything runs in namespaces this script makes and removes, and every process it starts is
ended by its PID; the flood stops by itself after --flood-seconds.

Usage (root): .venv/bin/python bench/handshake_flood.py [--seconds 8] [--flood-seconds 40]
    [--only CASE]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

from podwire.agent.engine import cookie, noise
from podwire.sandbox import netns, supervisor, tools

ENGINE = str(pathlib.Path(sys.executable).parent / "podwire-engine")
ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
# Each case: its binary and environment.
CASES = {
    "wireguard-go": ("wggo", {}),
    "engine (one socket)": ("engine", {"PODWIRE_ENGINE_STEERING": "off"}),
    "podwire-engine": ("engine", {}),
}
PORT = 51820
SOURCES = 100
FLOOD_NET = "198.51.100"
# For a target that is an IPv6 address: the sources are FLOOD_NET6 + 1, 2, ... (hex).
FLOOD_NET6 = "fd00:66::"
# The target: two retransmissions (REKEY_TIMEOUT 5 s, plus jitter) at most.
HANDSHAKE_DEADLINE = 12.0
HANDSHAKE_GIVE_UP = 25.0


# The flooder, run inside ns f by this same file.


def flood(
    target_public_b64: str,
    target: str,
    seconds: float,
    out: pathlib.Path,
    *,
    sources: int = SOURCES,
) -> None:
    """Sends one mac1-valid initiation after another from `sources` addresses (FLOOD_NET.1
    onwards, or FLOOD_NET6 1 onwards for an IPv6 target), round robin."""
    public = base64.b64decode(target_public_b64)
    identity = noise.StaticIdentity(os.urandom(32))
    handshake = noise.Handshake(public)
    handshake.precompute(identity)
    message = noise.create_initiation(
        handshake, identity, ephemeral_private=os.urandom(32), sender_index=1, wall_time=time.time()
    )
    data = cookie.CookieGenerator(public).stamp(message.pack(), now=0.0)
    socks = []
    for i in range(1, sources + 1):
        if ":" in target:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.bind((f"{FLOOD_NET6}{i:x}", 0))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"{FLOOD_NET}.{i}", 0))
        sock.setblocking(False)
        socks.append(sock.sendto)
    address = (target, PORT)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for send in socks:
            try:
                send(data, address)
                sent += 1
            except OSError:
                pass
    elapsed = time.monotonic() - start
    out.write_text(json.dumps({"sent": sent, "seconds": elapsed}))


# The bench.


def _iperf(f: netns.NetnsFactory, a: netns.Netns, b: netns.Netns, seconds: int) -> float:
    server = f.spawn(b, ["iperf3", "-s", "-1", "-B", "10.98.0.2"])
    try:
        supervisor.wait_until(
            lambda: b.run("ss", "-ltn", check=False).stdout.count(":5201") > 0,
            timeout=10,
            what="iperf3",
        )
        try:
            out = a.run(
                "iperf3", "-c", "10.98.0.2", "-t", str(seconds), "-J", "--connect-timeout",
                "5000", timeout=seconds + 20, check=False,
            )  # fmt: skip
            return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6
        except (subprocess.TimeoutExpired, ValueError, KeyError):
            return 0.0  # the stream could not run (or finish) at all
    finally:
        supervisor.stop(server)


def _cpu_seconds(ns: netns.Netns, comm: str) -> float:
    """User and system CPU of the namespace's processes named comm (the responder)."""
    total = 0
    for pid in netns.pids(ns.name):
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name == comm:
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _latest_handshake(ns: netns.Netns, dev: str) -> int:
    out = ns.run("wg", "show", dev, "latest-handshakes", check=False).stdout.split()
    return int(out[1]) if len(out) >= 2 else 0


def _device(
    f: netns.NetnsFactory,
    ns: netns.Netns,
    kind: str,
    workdir: pathlib.Path,
    keys: tuple[str, str],
    peer_public: str,
    peer_endpoint: str,
    address: str,
    env: dict[str, str],
) -> str:
    dev = f.unique("w")
    binary = ENGINE if kind == "engine" else tools.path("wireguard-go")
    f.spawn(ns, [binary, "-f", dev], log_path=workdir / f"{dev}.log", env={**ENV, **env})
    sock = pathlib.Path(f"/var/run/wireguard/{dev}.sock")
    supervisor.wait_until(lambda: sock.exists() and ns.link_exists(dev), timeout=20, what=dev)
    with tools.private_key_file(workdir / f"{dev}.key", keys[0]) as keyfile:
        ns.run(
            "wg", "set", dev, "private-key", str(keyfile), "listen-port", str(PORT),
            "peer", peer_public, "endpoint", peer_endpoint, "allowed-ips", "10.98.0.0/24",
        )  # fmt: skip
    ns.ip("addr", "add", address, "dev", dev)
    ns.ip("link", "set", dev, "up")
    return dev


def measure(
    case: str, seconds: int, flood_seconds: float, workdir: pathlib.Path
) -> dict[str, float]:
    kind, env = CASES[case]
    comm = "podwire-engine" if kind == "engine" else "wireguard-go"
    with netns.factory(prefix="pwf") as f:
        a, b, fl = f.namespace("a"), f.namespace("b"), f.namespace("f")
        f.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
        f_side, _ = f.veth(fl, b, a_addr=f"{FLOOD_NET}.1/24", b_addr=f"{FLOOD_NET}.254/24")
        for i in range(2, SOURCES + 1):
            fl.ip("addr", "add", f"{FLOOD_NET}.{i}/24", "dev", f_side)
        key_a, key_b = tools.wg_keypair(), tools.wg_keypair()
        dev_a = _device(
            f, a, kind, workdir, key_a, key_b[1], f"192.0.2.2:{PORT}", "10.98.0.1/24", env
        )
        _device(f, b, kind, workdir, key_b, key_a[1], f"192.0.2.1:{PORT}", "10.98.0.2/24", env)
        if not a.ping("10.98.0.2", count=3, timeout=10):
            raise SystemExit(f"{case}: no tunnel")
        quiet = _iperf(f, a, b, seconds)

        rate_file = workdir / f"{f.unique('r')}-flood.json"
        flooder = f.spawn(
            fl,
            [sys.executable, __file__, "flood", key_b[1], f"{FLOOD_NET}.254", str(flood_seconds),
             str(rate_file)],
        )  # fmt: skip
        time.sleep(2.0)  # the flood is on, and the responder has seen it
        cpu_start, wall_start = _cpu_seconds(b, comm), time.monotonic()
        # The legitimate peer loses its session: removed and put back, as after a restart.
        a.run("wg", "set", dev_a, "peer", key_b[1], "remove")
        a.run(
            "wg", "set", dev_a, "peer", key_b[1], "endpoint", f"192.0.2.2:{PORT}",
            "allowed-ips", "10.98.0.0/24",
        )  # fmt: skip
        began = time.monotonic()
        a.run("ping", "-c", "1", "-W", "1", "10.98.0.2", check=False)
        handshake_time = float("nan")
        while time.monotonic() - began < HANDSHAKE_GIVE_UP:
            if _latest_handshake(a, dev_a):
                handshake_time = time.monotonic() - began
                break
            time.sleep(0.1)
        flooded = float("nan")
        if handshake_time == handshake_time:  # not NaN: the stream can run
            remaining = flood_seconds - 2.0 - (time.monotonic() - began)
            flooded = _iperf(f, a, b, min(seconds, max(1, int(remaining) - 2)))
        cpu = (_cpu_seconds(b, comm) - cpu_start) / (time.monotonic() - wall_start)
        flooder.wait(timeout=flood_seconds + 30)
        sent = (
            json.loads(rate_file.read_text()) if rate_file.exists() else {"sent": 0, "seconds": 1}
        )
        return {
            "flood_per_second": sent["sent"] / sent["seconds"],
            "handshake_seconds": handshake_time,
            "quiet_mbps": quiet,
            "flooded_mbps": flooded,
            "share": flooded / quiet if quiet else float("nan"),
            "responder_cpu": cpu,
        }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "flood":
        sources = int(sys.argv[7]) if sys.argv[6:7] == ["--sources"] else SOURCES
        flood(
            sys.argv[2], sys.argv[3], float(sys.argv[4]), pathlib.Path(sys.argv[5]), sources=sources
        )
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=8, help="each iperf3 stream")
    p.add_argument("--flood-seconds", type=float, default=40.0)
    p.add_argument("--only", choices=list(CASES))
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="podwire-flood-"))
    results = {
        name: measure(name, args.seconds, args.flood_seconds, workdir)
        for name in CASES
        if args.only is None or args.only == name
    }
    print(
        f"\n{'responder':<22}{'flood/s':>10}{'handshake s':>13}{'quiet Mbit/s':>14}"
        f"{'flooded Mbit/s':>16}{'share':>8}{'CPU':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:<22}{r['flood_per_second']:>10.0f}{r['handshake_seconds']:>13.1f}"
            f"{r['quiet_mbps']:>14.0f}{r['flooded_mbps']:>16.0f}{r['share']:>8.2f}"
            f"{r['responder_cpu']:>7.2f}"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
