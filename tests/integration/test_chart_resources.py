"""The chart's requests and limits against what the agent, the engine and the operator use.

Two nodes with their agents (and each agent's podwire-engine) against the real apiserver, and
the operator leading: their CPU is read from /proc over an idle window and over a window of
TCP traffic between pods on the two nodes (iperf3, through the engines), and their peak RSS
(VmHWM) after both. A peak above the chart's memory limit would be an OOM kill in a cluster,
so that is what is asserted; the figures are printed (pytest -s) and are the ones in
values.yaml's comments.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import yaml

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology
from tests.integration.operator.conftest import Operators, wait_for
from tests.integration.test_chart_engine import _descendants, _ready
from tests.integration.test_chart_values import CHART

WINDOW = 10.0  # seconds of each measurement
TICK = os.sysconf("SC_CLK_TCK")
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def cpu_seconds(pid: int) -> float:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def peak_rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def quantity(text: str) -> int:
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def millicores(pids: dict[str, int], run: object) -> dict[str, float]:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    started = time.monotonic()
    if callable(run):
        run()
    else:
        time.sleep(WINDOW)
    elapsed = time.monotonic() - started
    return {k: 1000 * (cpu_seconds(p) - before[k]) / elapsed for k, p in pids.items()}


def test_peak_memory_stays_under_the_charts_limits(
    cluster: topology.Cluster, operators: Operators
) -> None:
    nodes = [cluster.add_node(f"node{i}") for i in (1, 2)]
    for node in nodes:
        cluster.start_agent(node)
    op = operators.start("op-resources")
    netns_mod.wait_until(
        lambda: all(_ready(cluster, n.name, peers=1) for n in nodes),
        timeout=60,
        what="both agents Ready with their peer",
    )
    wait_for(op.leading, timeout=20, what="the operator leading")
    (agent,) = [p for p in cluster.record.find("agent", "node1") if p.alive()]
    engines = [
        pid
        for pid in _descendants(agent.pid)
        if "podwire-engine" in pathlib.Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    ]
    assert len(engines) == 1, engines
    pids = {"agent": agent.pid, "engine": engines[0], "operator": op.proc.pid}

    idle = millicores(pids, None)
    src, dst = nodes[0].pods[0], nodes[1].pods[1]
    cluster.factory.spawn(dst.ns, ["iperf3", "-s", "-1"])
    netns_mod.wait_until(
        lambda: "5201" in dst.ns.run("ss", "-ltn").stdout, timeout=10, what="iperf3 listening"
    )
    result: dict[str, object] = {}

    def traffic() -> None:
        out = src.ns.run("iperf3", "-J", "-t", str(int(WINDOW)), "-c", dst.ip, timeout=WINDOW + 30)
        result.update(json.loads(out.stdout))

    busy = millicores(pids, traffic)
    sent = result["end"]["sum_received"]["bits_per_second"]  # type: ignore[index]
    peaks = {k: peak_rss(p) for k, p in pids.items()}
    print(f"\nidle millicores: { {k: round(v) for k, v in idle.items()} }")
    print(f"iperf3 through the engines: {sent / 1e6:.0f} Mbit/s")
    print(f"busy millicores: { {k: round(v) for k, v in busy.items()} }")
    print(f"peak RSS MiB: { {k: round(v / 2**20) for k, v in peaks.items()} }")

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    limits = {
        "agent": values["agent"]["resources"]["limits"]["memory"],
        "engine": values["engine"]["resources"]["limits"]["memory"],
        "operator": values["operator"]["resources"]["limits"]["memory"],
    }
    for what, limit in limits.items():
        assert 0 < peaks[what] < quantity(limit), f"{what}: peak {peaks[what]} B, limit {limit}"
