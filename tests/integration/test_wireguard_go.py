"""The WireGuard baselines of the test bed: wireguard-go in two namespaces, configured by `wg`.

ns a                               ns b
wg0 10.99.0.1/24 ---- tunnel ----  wg0 10.99.0.2/24
veth 192.0.2.1/24 ---- veth ----   192.0.2.2/24
"""

from __future__ import annotations

import pathlib

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools


def _start_wireguard_go(
    netns: netns_mod.NetnsFactory, ns: netns_mod.Netns, binary: str, dev: str, log: pathlib.Path
) -> None:
    netns.spawn(
        ns,
        [binary, "-f", dev],
        log_path=log,
        env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
    )
    sock = pathlib.Path(f"/var/run/wireguard/{dev}.sock")
    netns_mod.wait_until(
        lambda: sock.exists() and ns.link_exists(dev), timeout=15, what=f"{dev} to come up"
    )


@pytest.mark.parametrize("flavour", ["upstream", "debian"])
def test_wireguard_go_tunnel_carries_ping(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path, flavour: str
) -> None:
    binary = tools.path("wireguard-go") if flavour == "upstream" else tools.debian_wireguard_go()
    a, b = netns.namespace("a"), netns.namespace("b")
    netns.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    keys = {ns.name: tools.wg_keypair() for ns in (a, b)}
    devs = {}
    for i, (ns, peer, peer_ip) in enumerate(((a, b, "192.0.2.2"), (b, a, "192.0.2.1")), start=1):
        dev = netns.unique("w")
        devs[ns.name] = dev
        _start_wireguard_go(netns, ns, binary, dev, tmp_path / f"{dev}.log")
        keyfile = tools.write_private_key(tmp_path / f"{dev}.key", keys[ns.name][0])
        ns.run(
            "wg", "set", dev, "private-key", str(keyfile), "listen-port", "51820",
            "peer", keys[peer.name][1], "endpoint", f"{peer_ip}:51820", "allowed-ips", "10.99.0.0/24",
        )  # fmt: skip
        ns.ip("addr", "add", f"10.99.0.{i}/24", "dev", dev)
        ns.ip("link", "set", dev, "up")

    assert a.ping("10.99.0.2", count=3, timeout=10), "no answer across the tunnel"
    dump = a.run("wg", "show", devs[a.name], "dump").stdout.splitlines()
    peer_line = dump[1].split("\t")
    assert peer_line[0] == keys[b.name][1]
    assert int(peer_line[4]) > 0, "wg show reports no handshake"
    assert int(peer_line[5]) > 0 and int(peer_line[6]) > 0, "wg show reports no bytes moved"

    # The tunnel really is the path: without it, there is no route to 10.99.0.0/24.
    a.ip("link", "set", devs[a.name], "down")
    assert not a.ping("10.99.0.2", count=1, timeout=2)
