"""A handshake flood at the engine's port must not starve its data nor its peers' handshakes.

ns a (engine)                                ns b (engine)
10.99.0.1 =========== tunnel ===========     10.99.0.2
192.0.2.1 ----------- veth -------------     192.0.2.2
                                             198.51.100.254 ---- veth ---- ns f: flooder
                                                                 198.51.100.1-50
(and all of it over IPv6: fd00:2::1, fd00:2::2, fd00:66::fe and fd00:66::1-32)

The flooder (bench/handshake_flood.py's) sends initiations with a valid mac1 (they need only
b's public key, which every WireguardNode publishes) from fifty source addresses, as fast as
one process can. Meanwhile a loses its session to b (its peer removed and put back, as after a
restart), must handshake again within two retransmissions, and a ping stream must then keep
going with hardly a loss and no long delay. The stream's throughput with and without the
flood is printed, not asserted: on shared cores it says more about the neighbours.
"""

from __future__ import annotations

import pathlib
import re
import statistics
import sys
import time
from typing import Any

import pytest

from podwire.sandbox import netns as netns_mod

ROOT = pathlib.Path(__file__).resolve().parents[3]
FLOODER = ROOT / "bench" / "handshake_flood.py"
FLOOD_NET = "198.51.100"
FLOOD_NET6 = "fd00:66::"
SOURCES = 50
# Two retransmissions (REKEY_TIMEOUT 5 s plus jitter): a cookie round costs one.
HANDSHAKE_DEADLINE = 12.0
PINGS = 300
PING_INTERVAL = 0.02
STREAM_SECONDS = 4
MEDIAN_RTT_MS = 4.0


def _flood(bed: Any, b: Any, seconds: float, *, ipv6: bool) -> Any:
    f = bed.netns.namespace("f")
    f_side, b_side = bed.netns.veth(f, b.ns)
    if ipv6:
        target = f"{FLOOD_NET6}fe"
        b.ns.ip("addr", "add", f"{target}/64", "dev", b_side, "nodad")
        for i in range(1, SOURCES + 1):
            f.ip("addr", "add", f"{FLOOD_NET6}{i:x}/64", "dev", f_side, "nodad")
    else:
        target = f"{FLOOD_NET}.254"
        b.ns.ip("addr", "add", f"{target}/24", "dev", b_side)
        for i in range(1, SOURCES + 1):
            f.ip("addr", "add", f"{FLOOD_NET}.{i}/24", "dev", f_side)
    out = bed.tmp_path / "flood.json"
    return bed.netns.spawn(
        f,
        [sys.executable, str(FLOODER), "flood", b.public_key, target, str(seconds),
         str(out), "--sources", str(SOURCES)],
        log_path=bed.tmp_path / "flood.log",
    )  # fmt: skip


def _latest_handshake(side: Any) -> int:
    out = side.wg("show", side.dev, "latest-handshakes").stdout.split()
    return int(out[1]) if len(out) >= 2 else 0


def _ping_stream(a: Any, address: str) -> tuple[int, float]:
    """Pings sent back to back for PINGS * PING_INTERVAL seconds: (lost, median RTT in ms)."""
    seconds = PINGS * PING_INTERVAL
    proc = a.ns.run(
        "ping", "-n", "-c", str(PINGS), "-i", str(PING_INTERVAL), "-W", "1", address,
        timeout=seconds + 30, check=False,
    )  # fmt: skip
    rtts = [float(ms) for ms in re.findall(r"time=([\d.]+) ms", proc.stdout)]
    assert "packets transmitted" in proc.stdout, proc.stdout[-2000:] + proc.stderr
    return PINGS - len(rtts), statistics.median(rtts) if rtts else float("inf")


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_a_flood_neither_starves_the_data_nor_a_peers_handshake(bed: Any, ipv6: bool) -> None:
    w = bed.wire("engine", "engine", ipv6=ipv6)
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()
    quiet = bed.iperf(w.a, w.b, seconds=STREAM_SECONDS)
    flooder = _flood(bed, w.b, seconds=40, ipv6=ipv6)
    time.sleep(2.0)  # the flood is on, and b has seen it
    assert flooder.poll() is None, "the flooder ended early"

    # a loses its session: removed and put back, as after a restart.
    w.a.wg("set", w.a.dev, "peer", w.b.public_key, "remove")
    w.a.wg(
        "set", w.a.dev, "peer", w.b.public_key, "endpoint", w.b.endpoint,
        "allowed-ips", f"{w.b.tunnel}/32",
    )  # fmt: skip
    began = time.monotonic()
    w.a.ns.run("ping", "-c", "1", "-W", "1", w.b.tunnel, check=False)
    netns_mod.wait_until(
        lambda: _latest_handshake(w.a) > 0,
        timeout=HANDSHAKE_DEADLINE,
        what="a's handshake with b under the flood",
    )
    handshake = time.monotonic() - began

    lost, rtt = _ping_stream(w.a, w.b.tunnel)
    flooded = bed.iperf(w.a, w.b, seconds=STREAM_SECONDS)
    assert flooder.poll() is None, "the flood ended before the stream did"
    print(
        f"under the flood: handshake {handshake:.1f} s, {lost}/{PINGS} pings lost, {rtt:.1f} ms;"
        f" stream {flooded / 1e6:.0f} of {quiet / 1e6:.0f} Mbit/s"
    )
    assert lost <= PINGS // 20, f"{lost} of {PINGS} pings lost under the flood"
    # Before the kernel steered the flood apart, each ping waited behind thousands of flood
    # datagrams in the one socket over IPv4: a median of 10 to 27 ms (averages 7.5 to 12 ms),
    # against 0.8 to 1.2 ms now on 2 shared cores. Over IPv6 the flood this sender makes did
    # not queue up then (1.0 ms; the stream kept 0.14 of its throughput): that case shows
    # that steering works over IPv6, not the gain.
    assert rtt < MEDIAN_RTT_MS, f"pings took {rtt:.1f} ms (median) under the flood"


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_a_peer_handshakes_from_an_address_it_was_not_configured_with(bed: Any, ipv6: bool) -> None:
    """b does not know a's new address (its handshakes take the budgeted socket) and still
    answers; after it, a's handshakes come from a peer's endpoint again."""
    w = bed.wire("engine", "engine", ipv6=ipv6)
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()
    old, new, size = ("fd00:2::1", "fd00:2::11", 64) if ipv6 else ("192.0.2.1", "192.0.2.11", 24)
    w.a.ns.ip("addr", "del", f"{old}/{size}", "dev", w.veth_a)
    w.a.ns.ip("addr", "add", f"{new}/{size}", "dev", w.veth_a, *(["nodad"] if ipv6 else []))
    w.a.wg("set", w.a.dev, "peer", w.b.public_key, "remove")
    w.a.wg(
        "set", w.a.dev, "peer", w.b.public_key, "endpoint", w.b.endpoint,
        "allowed-ips", f"{w.b.tunnel}/32",
    )  # fmt: skip
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10), w.b.tail_log()
    endpoint = w.b.dump()[1][2]
    assert endpoint == (f"[{new}]:51820" if ipv6 else f"{new}:51820")
