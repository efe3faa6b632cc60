"""bench/round_trip: the round trip through podwire-engine against upstream wireguard-go, side by side.

bench/throughput.py measures each case in turn, and the round trip of an idle tunnel drifts
with the machine between cases (upstream wireguard-go's alone by 0.39-0.49 ms in one hour
here). This keeps every case's tunnel up at once, in namespaces of its own (as throughput.py
makes them), and pings them in turn, round after round, so each ratio compares the same
moments:

    for each round:  wireguard-go  |  engine <-> engine  |  engine -> wireguard-go  | ...
                     ping -c COUNT -i INTERVAL, the average of each

The default interval, 50 ms, is an idle tunnel (every traversal starts from cold caches);
--interval 0.002 a busy one. Reported: the median over rounds of each case's average, its
ratio to wireguard-go, and every round's figure. With --json, the figures too.

Usage (root): .venv/bin/python bench/round_trip.py [--rounds 8] [--count 50] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile

from throughput import BASE, CASES, interleaved_pings  # bench/ is the script's directory

DEFAULT_CASES = "wireguard-go,engine <-> engine,engine (pure Python),engine -> wireguard-go"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES or CASES[n] == (None, None)]
    if unknown or BASE not in names:
        parser.error(f"cases must include {BASE!r} and be tunnels of {sorted(CASES)}: {unknown}")
    with tempfile.TemporaryDirectory(prefix="podwire-rtt-") as tmp:
        figures = interleaved_pings(
            names, args.rounds, args.count, args.interval, pathlib.Path(tmp)
        )
    base = statistics.median(figures[BASE])
    print(f"{'case':40s} {'ms':>7s} {'ratio':>6s}  rounds")
    report = {}
    for name, values in figures.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:40s} {median:7.3f} {median / base:6.2f}  {rounds}")
        report[name] = {"median_ms": median, "ratio": median / base, "rounds_ms": values}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
