"""Captures on a test cluster's underlay, for the tests that prove nothing leaves in clear."""

from __future__ import annotations

import pathlib
import subprocess

from podwire.sandbox import netns, topology


def capture_underlay(
    cluster: topology.Cluster, tmp_path: pathlib.Path, *, name: str = "underlay"
) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
    """tcpdump on the underlay bridge, keeping every frame that carries a pod address in clear
    (WireGuard's own datagrams are between node addresses): a non-empty capture is a leak."""
    pcap, log = tmp_path / f"{name}.pcap", tmp_path / f"{name}-tcpdump.log"
    proc = cluster.factory.spawn(
        cluster.underlay,
        ["tcpdump", "-i", cluster.bridge, "-n", "-U", "-w", str(pcap), "net 10.244.0.0/16"],
        log_path=log,
    )
    netns.wait_until(
        lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump to listen"
    )
    return proc, pcap
