"""Sessions that must survive: a peer that moves, a peer that restarts, keys that expire, and
a flood of garbage at the listen port.

ns a (engine)                          ns b (wireguard-go or engine)
10.99.0.1 ========== tunnel =========  10.99.0.2
192.0.2.1 (later .4) --- veth ---      192.0.2.2 (later .3)
"""

from __future__ import annotations

import itertools
import re
import sys
import time
from typing import Any

import enginelog
import pytest

from podwire.agent.engine.counters import Drop
from podwire.sandbox import netns as netns_mod

SHORT_TIMERS = "rekey_after_time=4,reject_after_time=7,keepalive_timeout=1,rekey_timeout=1,rekey_attempt_time=5"


def _endpoint_of_peer(side: Any) -> str:
    return str(side.dump()[1][2])


def _move(side: Any, veth: str, old: str, new: str) -> None:
    # Deleting first: deleting a primary address would take its secondaries along.
    side.ns.ip("addr", "del", f"{old}/24", "dev", veth)
    side.ns.ip("addr", "add", f"{new}/24", "dev", veth)


def test_roaming_endpoints_follow_the_peer(bed: Any) -> None:
    w = bed.wire("engine", "wireguard-go")
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()
    assert _endpoint_of_peer(w.a) == "192.0.2.2:51820"

    # The peer moves: the engine learns its new address from its next authenticated packet.
    _move(w.b, w.veth_b, "192.0.2.2", "192.0.2.3")
    assert w.b.ns.ping(w.a.tunnel, count=3, timeout=10), w.a.tail_log()
    assert _endpoint_of_peer(w.a) == "192.0.2.3:51820"
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10)

    # The engine moves: its datagrams leave from the new address and the peer follows.
    _move(w.a, w.veth_a, "192.0.2.1", "192.0.2.4")
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10), w.a.tail_log()
    assert _endpoint_of_peer(w.b) == "192.0.2.4:51820"
    assert w.b.ns.ping(w.a.tunnel, count=3, timeout=10)


def test_a_restarted_peer_gets_a_new_session_by_itself(bed: Any) -> None:
    w = bed.wire("engine", "wireguard-go")
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()

    w.b.stop(kill=True)
    w.b.start()
    w.b.configure(w.a)
    # Only the engine sends: it must notice that its old session is dead and handshake again
    # (keepalive timeout + rekey timeout: about 15 s).
    started = time.monotonic()
    netns_mod.wait_until(
        lambda: w.a.ns.ping(w.b.tunnel, count=1, timeout=1),
        timeout=40,
        interval=0.1,
        what="the session to come back",
    )
    print(f"session back after {time.monotonic() - started:.1f}s")
    assert w.a.alive()


@pytest.mark.parametrize("peer_kind", ["engine", "wireguard-go"])
def test_traffic_never_stops_across_rekeys(bed: Any, peer_kind: str) -> None:
    env = {"PODWIRE_ENGINE_TIMERS": SHORT_TIMERS}
    w = bed.wire("engine", peer_kind, a_env=env, b_env=env)
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()

    # 15 s: past rekey-after-time three times and past reject-after-time twice.
    proc = w.a.ns.run(
        "ping",
        "-n",
        "-D",
        "-i",
        "0.05",
        "-c",
        "300",
        "-W",
        "1",
        w.b.tunnel,
        timeout=60,
        check=False,
    )
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", proc.stdout, re.M)]
    assert len(stamps) > 250, proc.stdout[-2000:]
    longest_gap = max(b - a for a, b in itertools.pairwise(stamps))
    lost = 300 - len(stamps)
    print(f"{lost} of 300 pings lost, longest gap {longest_gap:.2f}s")
    assert longest_gap < 1.0, f"traffic stopped for {longest_gap:.2f}s"

    handshakes = enginelog.events(w.a.log, "handshake_completed")
    assert len(handshakes) >= 3, f"expected rekeys, saw {len(handshakes)} handshakes"


GARBAGE = r"""
import os, random, socket, struct, sys
target = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rnd = random.Random(7)
def body(n): return bytes(rnd.getrandbits(8) for _ in range(n))
shapes = [
    lambda: b"",
    lambda: body(rnd.randrange(1, 4)),
    lambda: struct.pack("<I", rnd.randrange(5, 2**32)) + body(rnd.randrange(0, 200)),
    lambda: struct.pack("<I", 1) + body(144),
    lambda: struct.pack("<I", 1) + body(rnd.randrange(0, 300)),
    lambda: struct.pack("<I", 2) + body(88),
    lambda: struct.pack("<I", 3) + body(60),
    lambda: struct.pack("<I", 4) + body(12),
    lambda: struct.pack("<I", 4) + body(rnd.randrange(28, 1500)),
]
for i in range(int(sys.argv[3])):
    try:
        s.sendto(rnd.choice(shapes)(), target)
    except OSError:
        pass
"""


def test_garbage_datagrams_are_dropped_and_counted(bed: Any) -> None:
    w = bed.wire("engine", "wireguard-go")
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10), w.a.tail_log()
    pinger = w.a.netns.spawn(
        w.a.ns,
        ["ping", "-n", "-q", "-i", "0.05", "-c", "120", w.b.tunnel],
        log_path=bed.tmp_path / "ping.log",
    )
    w.b.ns.run(sys.executable, "-c", GARBAGE, w.a.underlay, "51820", "20000", timeout=120)
    assert pinger.wait(30) == 0
    summary = (bed.tmp_path / "ping.log").read_text()
    received = int(re.search(r"(\d+) received", summary).group(1))  # type: ignore[union-attr]
    assert received >= 100, summary
    assert w.a.alive(), w.a.tail_log()
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=5)

    w.a.stop()
    assert w.a.proc.returncode == 0
    (stopping,) = enginelog.events(w.a.log, "engine_stopping")
    assert stopping["reason"] == "SIGTERM"
    for reason in (Drop.SHORT, Drop.UNKNOWN_TYPE, Drop.BAD_MAC1, Drop.UNKNOWN_RECEIVER):
        assert stopping[reason.value] > 0, (reason, stopping)
    assert stopping[Drop.INTERNAL_ERROR.value] == 0
    assert not w.a.ns.link_exists(w.a.dev) and not w.a.socket.exists()
