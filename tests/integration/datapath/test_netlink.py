"""agent/netlink/ in a throwaway namespace: routes, the fail-closed route, MTU, kernel WireGuard, offloads.

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

from podwire.agent import config, reconcile
from podwire.agent.datapath import routes as dp_routes
from podwire.agent.datapath import select, userspace
from podwire.agent.netlink import core, links, offloads, routes, underlay, wireguard
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


def _config(tmp_path: pathlib.Path, datapath: config.Datapath) -> config.Config:
    return config.Config(
        node_name="n",
        key_path=tmp_path / "private.key",
        datapath=datapath,
        device="pwkwg",
        cluster_pod_cidrs=CLUSTER,
    )


def _tx_packets(ns: netns_mod.Netns, dev: str) -> int:
    out = ns.ip("-s", "-j", "link", "show", "dev", dev).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def test_routes_are_added_listed_and_removed_by_protocol(
    netns: netns_mod.NetnsFactory,
) -> None:
    node, _, _ = _node(netns)
    _stand_in(node)
    node.ip("route", "add", "10.250.0.0/24", "dev", "pwdummy")  # someone else's: not ours
    table = dp_routes.Routes("pwdummy", netns=node.name)
    nets = (ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd00:244:0:2::/64"))
    table.apply(reconcile.RoutePlan(add=nets))
    table.apply(reconcile.RoutePlan(add=nets))  # idempotent
    assert sorted(table.list_routes(), key=str) == sorted(nets, key=str)
    assert "proto 251" in node.ip("route", "show", "10.244.2.0/24").stdout
    table.apply(reconcile.RoutePlan(remove=nets[:1]))
    assert table.list_routes() == [nets[1]]
    routes.apply_routes("pwdummy", [], [nets[0]], netns=node.name)  # gone already is fine
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

    table = dp_routes.Routes("pwdummy", netns=node.name)
    table.install_fail_closed(CLUSTER)
    table.install_fail_closed(CLUSTER)  # idempotent
    assert sorted(table.list_fail_closed(), key=str) == sorted(CLUSTER, key=str)
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
    routes.apply_routes("pwdummy", [ipaddress.ip_network("10.244.5.0/24")], [], netns=node.name)
    got = node.ip("route", "get", "10.244.5.1").stdout
    assert "dev pwdummy" in got
    assert "unreachable" in node.ip("route", "get", "10.244.6.1", check=False).stderr + (
        node.ip("route", "show", "10.244.0.0/16").stdout
    )

    table.remove_fail_closed(CLUSTER)
    assert table.list_fail_closed() == []


def test_mtu_comes_from_the_underlay(netns: netns_mod.NetnsFactory) -> None:
    node, _, veth = _node(netns, mtu=1420)
    assert underlay.find(netns=node.name) == underlay.Underlay(veth, 1420, False)
    assert underlay.find(address="192.0.2.1", netns=node.name).device == veth
    assert underlay.find(address="fd00:2::1", netns=node.name).ipv6
    _stand_in(node)
    links.set_mtu("pwdummy", 1360, netns=node.name)
    links.set_link_up("pwdummy", netns=node.name)
    assert links.link_mtu("pwdummy", netns=node.name) == 1360
    with pytest.raises(core.NetlinkError) as info:
        links.set_mtu("nosuchdev", 1360, netns=node.name)
    assert info.value.errno != 0


def test_no_kernel_wireguard_is_a_typed_signal_for_auto(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    node, _, _ = _node(netns)
    if links.link_exists("pwkwg", netns=node.name):
        pytest.fail("the namespace is new; it cannot hold pwkwg")
    try:
        wireguard.create_device("pwkwg", netns=node.name)
    except core.KernelWireguardUnavailable as exc:
        assert exc.errno != 0
    else:
        links.delete_link("pwkwg", netns=node.name)
        pytest.skip("this kernel has WireGuard; the kernel tier tests that path")
    backend = select.open_backend(_config(tmp_path, "auto"), netns=node.name)
    assert isinstance(backend, userspace.UserspaceBackend)
    with pytest.raises(core.KernelWireguardUnavailable):
        select.open_backend(_config(tmp_path, "kernel"), netns=node.name)
    assert not links.link_exists("pwkwg", netns=node.name)


def test_feature_detection_reports_without_failing(netns: netns_mod.NetnsFactory) -> None:
    node, _, veth = _node(netns)
    _stand_in(node)
    report = offloads.apply_features("pwdummy", underlay_device=veth, netns=node.name)
    names = set(report.applied) | {name for name, _ in report.skipped}
    assert names == {"gro", "big_tcp", "udp_gro_forwarding"}
    if "gro" in report.applied:
        details = json.loads(node.ip("-d", "-j", "link", "show", "pwdummy").stdout)[0]
        assert details["gro_max_size"] > 65536
    off = offloads.apply_features(
        "pwdummy", gro=False, big_tcp=False, udp_gro_forwarding=False, netns=node.name
    )
    assert off.applied == () and all(why == "turned off" for _, why in off.skipped)


def test_strict_mode_beats_a_more_specific_route_in_main_and_is_put_back(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    node, peer, _ = _node(netns)
    _stand_in(node)
    own = (ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:244:0:1::/64"))
    node.ip("route", "add", "10.244.1.0/24", "dev", "pwdummyp")  # the CNI's route to local pods
    table = dp_routes.Routes("pwdummy", netns=node.name, strict=True)
    table.install_fail_closed(CLUSTER)
    table.apply(reconcile.RoutePlan(add=(ipaddress.ip_network("10.244.2.0/24"),)))
    first = table.guard(CLUSTER, own=own, fail_closed=True, underlay_address="192.0.2.1")
    assert any("lookup" in r for r in first.restored) and first.competing == ()
    # Another program's more specific routes in main, out of the underlay, in both families.
    node.ip("route", "add", "10.244.2.7/32", "via", "192.0.2.2")
    node.ip("route", "add", "10.244.5.7/32", "via", "192.0.2.2")
    node.ip("-6", "route", "add", "fd00:244:0:5::7/128", "via", "fd00:2::2")
    found = table.guard(CLUSTER, own=own, fail_closed=True, underlay_address="192.0.2.1")
    assert found.restored == ()
    assert sorted(c.split()[0] for c in found.competing) == [
        "10.244.2.7/32", "10.244.5.7/32", "fd00:244:0:5::7/128",
    ]  # fmt: skip
    assert "dev pwdummy" in node.ip("route", "get", "10.244.2.7").stdout  # the peer's, not theirs
    assert "dev pwdummyp" in node.ip("route", "get", "10.244.1.9").stdout  # local pods: main
    for dst in ("10.244.5.7", "fd00:244:0:5::7"):  # no peer: the backstop, not their route
        got = node.ip("route", "get", dst, check=False)
        assert "unreachable" in got.stdout + got.stderr or got.returncode != 0, got.stdout

    peer_veth = json.loads(peer.ip("-j", "link", "show", "type", "veth").stdout)[0]["ifname"]
    pcap, log = tmp_path / "underlay.pcap", tmp_path / "tcpdump.log"
    capture = netns.spawn(
        peer,
        ["tcpdump", "-i", peer_veth, "-n", "-U", "-w", str(pcap), "net 10.244.0.0/16 or net fd00:244::/56"],
        log_path=log,
    )  # fmt: skip
    netns_mod.wait_until(
        lambda: "listening on" in log.read_text(), timeout=20, what="tcpdump to listen"
    )
    assert not node.ping("10.244.5.7", count=2, timeout=1)
    assert not node.ping("fd00:244:0:5::7", count=2, timeout=1)
    node.ping("10.244.2.7", count=2, timeout=1)  # into the stand-in link, not the underlay
    netns_mod.stop_process(capture)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True)
    assert read.stdout.strip() == "", f"pod traffic left the node in clear: {read.stdout}"

    # Removed by hand, put back by the next guard.
    node.ip("rule", "del", "priority", "5210", "to", "10.244.0.0/16")
    node.ip("-6", "route", "del", "unreachable", "fd00:244::/56", "table", str(routes.TABLE))
    node.ip("route", "del", "unreachable", "10.244.0.0/16")
    again = table.guard(CLUSTER, own=own, fail_closed=True, underlay_address="192.0.2.1")
    assert len(again.restored) == 3, again.restored
    assert "lookup" in node.ip("rule", "show", "priority", "5210").stdout
    assert "unreachable" in node.ip("-6", "route", "show", "table", str(routes.TABLE)).stdout
    assert "10.244.0.0/16" in node.ip("route", "show", "type", "unreachable").stdout
    assert (
        table.guard(CLUSTER, own=own, fail_closed=True, underlay_address="192.0.2.1").restored == ()
    )

    # strictMode off takes the rules away again.
    dp_routes.Routes("pwdummy", netns=node.name).guard(
        CLUSTER, own=own, fail_closed=True, underlay_address="192.0.2.1"
    )
    assert "5210" not in node.ip("rule").stdout and "5200" not in node.ip("rule").stdout
