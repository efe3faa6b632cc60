"""netlink.py in a throwaway namespace: routes, the fail-closed route, MTU, kernel WireGuard, offloads.

ns node                                     ns peer
veth pwdummy (stands for the WireGuard link)
veth 192.0.2.1/24, fd00:2::1/64 ----------- 192.0.2.2/24, fd00:2::2/64
default via 192.0.2.2 / fd00:2::2
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import subprocess

import pytest

from podwire.agent import datapath, netlink, reconcile
from podwire.sandbox import netns as netns_mod

CLUSTER = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/56"))


def _node(
    factory: netns_mod.NetnsFactory, *, mtu: int = 1500
) -> tuple[netns_mod.Netns, netns_mod.Netns, str]:
    node, peer = factory.namespace("n"), factory.namespace("p")
    veth, _ = factory.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24", mtu=mtu)
    node.ip("addr", "add", "fd00:2::1/64", "dev", veth, "nodad")
    peer.ip("addr", "add", "fd00:2::2/64", "dev", _, "nodad")
    node.ip("route", "add", "default", "via", "192.0.2.2")
    node.ip("-6", "route", "add", "default", "via", "fd00:2::2")
    return node, peer, veth


def _stand_in(ns: netns_mod.Netns) -> None:
    # A veth pair inside the node stands for the WireGuard link (this kernel has no dummy).
    ns.ip("link", "add", "pwdummy", "type", "veth", "peer", "name", "pwdummyp")
    for dev in ("pwdummy", "pwdummyp"):
        ns.ip("link", "set", dev, "up")


def _tx_packets(ns: netns_mod.Netns, dev: str) -> int:
    out = ns.ip("-s", "-j", "link", "show", "dev", dev).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def test_routes_are_added_listed_and_removed_by_protocol(
    netns: netns_mod.NetnsFactory,
) -> None:
    node, _, _ = _node(netns)
    _stand_in(node)
    node.ip("route", "add", "10.250.0.0/24", "dev", "pwdummy")  # someone else's: not ours
    routes = datapath.Routes("pwdummy", netns=node.name)
    nets = (ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd00:244:0:2::/64"))
    routes.apply(reconcile.RoutePlan(add=nets))
    routes.apply(reconcile.RoutePlan(add=nets))  # idempotent
    assert sorted(routes.list_routes(), key=str) == sorted(nets, key=str)
    assert "proto 251" in node.ip("route", "show", "10.244.2.0/24").stdout
    routes.apply(reconcile.RoutePlan(remove=nets[:1]))
    assert routes.list_routes() == [nets[1]]
    netlink.apply_routes("pwdummy", [], [nets[0]], netns=node.name)  # gone already is fine
    assert "10.250.0.0/24" in node.ip("route").stdout


def test_fail_closed_route_drops_what_no_peer_covers(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    node, peer, veth = _node(netns)
    peer_veth = peer.ip("-j", "link", "show", "type", "veth").stdout
    peer_veth = json.loads(peer_veth)[0]["ifname"]
    # Without it, traffic to the pod range follows the default route out in clear.
    before = _tx_packets(node, veth)
    node.ping("10.244.5.1", count=1, timeout=1)
    assert _tx_packets(node, veth) > before, "the check must see packets leave without it"

    routes = datapath.Routes("pwdummy", netns=node.name)
    routes.install_fail_closed(CLUSTER)
    routes.install_fail_closed(CLUSTER)  # idempotent
    assert sorted(routes.list_fail_closed(), key=str) == sorted(CLUSTER, key=str)
    # The counter also sees ARP and router solicitations; a capture of the pod range does not.
    pcap, log = tmp_path / "underlay.pcap", tmp_path / "tcpdump.log"
    capture = netns.spawn(
        peer,
        ["tcpdump", "-i", peer_veth, "-n", "-U", "-w", str(pcap), "net 10.244.0.0/16 or net fd00:244::/56"],
        log_path=log,
    )  # fmt: skip
    netns_mod.wait_until(
        lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump to listen"
    )
    assert not node.ping("10.244.5.1", count=2, timeout=1)
    assert not node.ping("fd00:244::5", count=2, timeout=1)
    netns_mod.stop_process(capture)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    assert read.stdout.strip() == "", f"packets to the pod range left the node: {read.stdout}"

    # A peer's route is more specific and wins over the fail-closed one.
    _stand_in(node)
    netlink.apply_routes("pwdummy", [ipaddress.ip_network("10.244.5.0/24")], [], netns=node.name)
    got = node.ip("route", "get", "10.244.5.1").stdout
    assert "dev pwdummy" in got
    assert "unreachable" in node.ip("route", "get", "10.244.6.1", check=False).stderr + (
        node.ip("route", "show", "10.244.0.0/16").stdout
    )

    routes.remove_fail_closed(CLUSTER)
    assert routes.list_fail_closed() == []


def test_mtu_comes_from_the_underlay(netns: netns_mod.NetnsFactory) -> None:
    node, _, veth = _node(netns, mtu=1420)
    assert netlink.underlay(netns=node.name) == netlink.Underlay(veth, 1420, False)
    assert netlink.underlay(address="192.0.2.1", netns=node.name).device == veth
    assert netlink.underlay(address="fd00:2::1", netns=node.name).ipv6
    _stand_in(node)
    netlink.set_mtu("pwdummy", 1360, netns=node.name)
    netlink.set_link_up("pwdummy", netns=node.name)
    assert netlink.link_mtu("pwdummy", netns=node.name) == 1360
    with pytest.raises(netlink.NetlinkError) as info:
        netlink.set_mtu("nosuchdev", 1360, netns=node.name)
    assert info.value.errno != 0


def test_no_kernel_wireguard_is_a_typed_signal_for_auto(netns: netns_mod.NetnsFactory) -> None:
    node, _, _ = _node(netns)
    if netlink.link_exists("pwkwg", netns=node.name):
        pytest.fail("the namespace is new; it cannot hold pwkwg")
    try:
        netlink.create_kernel_device("pwkwg", netns=node.name)
    except netlink.KernelWireguardUnavailable as exc:
        assert exc.errno != 0
    else:
        netlink.delete_link("pwkwg", netns=node.name)
        pytest.skip("this kernel has WireGuard; the kernel tier tests that path")
    backend = datapath.select_backend("auto", "pwkwg", netns=node.name)
    assert isinstance(backend, datapath.UserspaceBackend)
    with pytest.raises(netlink.KernelWireguardUnavailable):
        datapath.select_backend("kernel", "pwkwg", netns=node.name)
    assert not netlink.link_exists("pwkwg", netns=node.name)


def test_feature_detection_reports_without_failing(netns: netns_mod.NetnsFactory) -> None:
    node, _, veth = _node(netns)
    _stand_in(node)
    report = netlink.apply_features("pwdummy", underlay_device=veth, netns=node.name)
    names = set(report.applied) | {name for name, _ in report.skipped}
    assert names == {"gro", "big_tcp", "udp_gro_forwarding"}
    if "gro" in report.applied:
        details = json.loads(node.ip("-d", "-j", "link", "show", "pwdummy").stdout)[0]
        assert details["gro_max_size"] > 65536
    off = netlink.apply_features(
        "pwdummy", gro=False, big_tcp=False, udp_gro_forwarding=False, netns=node.name
    )
    assert off.applied == () and all(why == "turned off" for _, why in off.skipped)
