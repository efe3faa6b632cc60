"""`wg` against podwire-engine: set, show, dump, showconf, and the UAPI's answers to bad input.

The peer is upstream wireguard-go, so what `wg` reads back from the engine describes a session
with a real WireGuard.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from podwire.sandbox import netns as netns_mod


def _peer_line(side: Any) -> list[str]:
    lines = side.dump()
    assert len(lines) == 2, lines
    return lines[1]


def test_wg_configures_and_reads_back_the_engine(bed: Any) -> None:
    w = bed.wire("engine", "wireguard-go")
    psk = bed.tmp_path / "psk"
    psk.write_text(w.a.ns.run("wg", "genpsk").stdout)
    for side, peer in ((w.a, w.b), (w.b, w.a)):
        side.wg(
            "set",
            side.dev,
            "peer",
            peer.public_key,
            "preshared-key",
            str(psk),
            "persistent-keepalive",
            "25",
        )
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10), w.a.tail_log()

    device_line = w.a.dump()[0]
    assert device_line[:4] == [
        w.a.private_key,
        w.a.ns.run("wg", "show", w.a.dev, "public-key").stdout.strip(),
        "51820",
        "off",
    ]
    public, preshared, endpoint, allowed, handshake, rx, tx, keepalive = _peer_line(w.a)
    assert (public, preshared, endpoint, allowed, keepalive) == (
        w.b.public_key, psk.read_text().strip(), "192.0.2.2:51820", "10.99.0.2/32", "25",
    )  # fmt: skip
    assert abs(time.time() - int(handshake)) < 30, "no recent handshake"
    assert int(rx) > 0 and int(tx) > 0

    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10)
    _, _, _, _, _, rx2, tx2, _ = _peer_line(w.a)
    assert int(rx2) > int(rx) and int(tx2) > int(tx), "byte counters do not grow"
    shown = w.a.wg("show", w.a.dev).stdout
    assert (
        "latest handshake" in shown and "transfer" in shown and "preshared key: (hidden)" in shown
    )

    # showconf round-trips: what it prints, setconf takes back unchanged.
    conf = w.a.wg("showconf", w.a.dev).stdout
    assert f"PrivateKey = {w.a.private_key}" in conf and "PersistentKeepalive = 25" in conf
    saved = bed.tmp_path / "saved.conf"
    saved.write_text(conf)
    w.a.wg("setconf", w.a.dev, str(saved))
    assert w.a.wg("showconf", w.a.dev).stdout == conf

    # fwmark, a new listen port (the peer follows the roaming source port) and back.
    w.a.wg("set", w.a.dev, "fwmark", "0x1234", "listen-port", "51900")
    assert w.a.dump()[0][2:4] == ["51900", "0x1234"]
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10), w.a.tail_log()
    assert _peer_line(w.b)[2] == "192.0.2.1:51900"
    w.a.wg("set", w.a.dev, "fwmark", "0", "listen-port", "0")
    port = w.a.dump()[0][2]
    assert port not in ("0", "51900") and w.a.dump()[0][3] == "off"
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=10)

    # Peers removed and replaced.
    w.a.wg("set", w.a.dev, "peer", w.b.public_key, "remove")
    assert len(w.a.dump()) == 1
    assert not w.a.ns.ping(w.b.tunnel, count=1, timeout=2)
    w.a.wg("setconf", w.a.dev, str(saved))
    assert w.a.ns.ping(w.b.tunnel, count=3, timeout=15), w.a.tail_log()


def test_bad_uapi_requests_get_einval_and_traffic_flows_on(bed: Any) -> None:
    w = bed.wire("engine", "wireguard-go")
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=10)
    pinger = w.a.netns.spawn(
        w.a.ns,
        ["ping", "-n", "-i", "0.1", "-c", "60", w.b.tunnel],
        log_path=bed.tmp_path / "ping.log",
    )
    bad = [
        b"set=1\nlisten_port=70000\n\n",
        b"set=1\nprivate_key=nothex\n\n",
        b"set=1\npublic_key=" + b"ab" * 32 + b"\nallowed_ip=10.0.0.0/99\n\n",
        b"set=1\npublic_key=" + b"ab" * 32 + b"\nendpoint=nowhere:1\n\n",
        b"set=1\nno equals sign\n\n",
        b"set=1\n\xff\xfe\n\n",
        b"hello=1\n\n",
        b"get=1\nextra=1\n\n",
    ]
    for request in bad:
        assert w.a.uapi(request) == b"errno=22\n\n", request
    # Nothing of a rejected set was applied: the bad peer is not there.
    assert len(w.a.dump()) == 2
    # Several requests on one connection, the bad one in the middle.
    answer = w.a.uapi(b"get=1\n\nset=1\nbogus=1\n\nget=1\n\n")
    assert answer.count(b"errno=0\n\n") == 2 and b"errno=22\n\n" in answer
    # A taken port: EADDRINUSE, and the engine stays on its port.
    holder = w.a.netns.spawn(
        w.a.ns,
        [sys.executable, "-c", "import socket,time; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
         "s.bind(('::', 40000)); time.sleep(120)"],
    )  # fmt: skip
    netns_mod.wait_until(
        lambda: "40000" in w.a.ns.run("ss", "-uln").stdout, timeout=10, what="the port holder"
    )
    assert w.a.uapi(b"set=1\nlisten_port=40000\n\n") == b"errno=98\n\n"
    assert w.a.dump()[0][2] == "51820"
    netns_mod.stop_process(holder)

    assert pinger.wait(30) == 0, (bed.tmp_path / "ping.log").read_text()
    assert w.a.alive()
    assert w.a.ns.ping(w.b.tunnel, count=2, timeout=5)
