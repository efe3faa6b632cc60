"""podwire-engine against itself and against both wireguard-go builds: ping, then iperf3 for
10 seconds each way, the measured rates recorded for the session summary."""

from __future__ import annotations

from typing import Any

import pytest

# Each test runs on both fast paths, native and pure Python (conftest.fast_path).
pytestmark = pytest.mark.usefixtures("fast_path")


@pytest.mark.parametrize("peer_kind", ["engine", "wireguard-go", "debian-wireguard-go"])
def test_engine_talks_to(bed: Any, peer_kind: str) -> None:
    w = bed.wire("engine", peer_kind)
    assert w.a.ns.ping(w.b.tunnel, count=5, timeout=10), w.a.tail_log()
    assert w.b.ns.ping(w.a.tunnel, count=5, timeout=10), w.a.tail_log()

    forward = bed.iperf(w.a, w.b)
    reverse = bed.iperf(w.a, w.b, reverse=True)
    bed.record(f"engine -> {peer_kind}", forward)
    bed.record(f"engine <- {peer_kind} (-R)", reverse)
    assert forward > 1e6 and reverse > 1e6, (forward, reverse)
    assert w.a.alive() and w.b.alive()


@pytest.mark.parametrize("peer_kind", ["engine", "wireguard-go"])
def test_ipv6_underlay(bed: Any, peer_kind: str) -> None:
    w = bed.wire("engine", peer_kind, ipv6=True)
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10), w.a.tail_log()
    assert w.b.ns.ping(w.a.tunnel, count=3, timeout=10), w.a.tail_log()
    assert w.a.dump()[1][2] == "[fd00:2::2]:51820"
    assert w.b.dump()[1][2] == "[fd00:2::1]:51820"
