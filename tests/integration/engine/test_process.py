"""podwire-engine as a process, with wireguard-go's conventions: detaching once ready, refusing a
device in use, replacing a stale socket, ending cleanly on SIGTERM or when its link is deleted,
and standing in for wireguard-go under wg-quick."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any

from podwire.sandbox import netns as netns_mod

SOCKET_DIR = pathlib.Path("/var/run/wireguard")


def _engine() -> str:
    return str(pathlib.Path(sys.executable).parent / "podwire-engine")


def _pids(ns: netns_mod.Netns) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_detaches_once_ready_and_sigterm_cleans_up(netns: netns_mod.NetnsFactory) -> None:
    ns = netns.namespace("p")
    dev = netns.unique("w")
    sock = SOCKET_DIR / f"{dev}.sock"
    # The command returns only when the engine in the background serves.
    ns.run(_engine(), dev, timeout=30)
    assert ns.link_exists(dev) and netns_mod.unix_socket_answers(sock)
    assert ns.run("wg", "show", dev, "listen-port").stdout.strip().isdigit()
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(SOCKET_DIR.stat().st_mode & 0o777) == "0o700"

    second = ns.run(_engine(), dev, check=False, timeout=30)
    assert second.returncode == 1 and dev in second.stderr, second.stderr
    assert ns.link_exists(dev) and netns_mod.unix_socket_answers(sock), (
        "a refused second start must not hurt the first"
    )

    (pid,) = _pids(ns)
    os.kill(pid, signal.SIGTERM)
    netns_mod.wait_until(lambda: not _pids(ns), timeout=10, what="the engine to exit")
    assert not ns.link_exists(dev) and not sock.exists()


def test_a_stale_socket_is_replaced_and_link_deletion_ends_the_engine(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    ns = netns.namespace("p")
    dev = netns.unique("w")
    sock = SOCKET_DIR / f"{dev}.sock"
    SOCKET_DIR.mkdir(mode=0o700, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))  # closed without unlinking: what a crash leaves
    try:
        proc = netns.spawn(ns, [_engine(), "-f", dev], log_path=tmp_path / "engine.log")
        netns_mod.wait_until(
            lambda: ns.link_exists(dev) and netns_mod.unix_socket_answers(sock),
            timeout=20,
            what="the engine",
        )
        ns.ip("link", "del", dev)
        assert proc.wait(10) == 0, (tmp_path / "engine.log").read_text()
        assert not sock.exists()
        assert '"reason": "tun_device_removed"' in (tmp_path / "engine.log").read_text()
    finally:
        sock.unlink(missing_ok=True)


def test_wg_quick_uses_the_engine_as_its_userspace_implementation(bed: Any) -> None:
    a, b = bed.netns.namespace("a"), bed.netns.namespace("b")
    bed.netns.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    peer = bed.side(b, "engine", "192.0.2.2", "10.99.0.2", {})
    dev = bed.netns.unique("q")
    private = a.run("wg", "genkey").stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True
    ).stdout.strip()
    conf = bed.tmp_path / f"{dev}.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {private}\nAddress = 10.99.0.1/24\nListenPort = 51820\n\n"
        f"[Peer]\nPublicKey = {peer.public_key}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.99.0.2/32\n"
    )
    conf.chmod(0o600)
    peer.wg(
        "set", peer.dev, "private-key", str(peer.keyfile), "listen-port", "51820",
        "peer", public, "endpoint", "192.0.2.1:51820", "allowed-ips", "10.99.0.1/32",
    )  # fmt: skip
    peer.ns.ip("addr", "add", "10.99.0.2/24", "dev", peer.dev)
    peer.ns.ip("link", "set", peer.dev, "up")

    env = ["env", f"WG_QUICK_USERSPACE_IMPLEMENTATION={_engine()}"]
    up = a.run(*env, "wg-quick", "up", str(conf), check=False, timeout=60)
    assert up.returncode == 0, up.stderr
    assert a.ping("10.99.0.2", count=3, timeout=10)
    down = a.run(*env, "wg-quick", "down", str(conf), check=False, timeout=60)
    assert down.returncode == 0, down.stderr
    netns_mod.wait_until(
        lambda: not (SOCKET_DIR / f"{dev}.sock").exists(), timeout=10, what="the engine to go"
    )
    assert not a.link_exists(dev)
