"""Routes over lanes in a throwaway namespace: multipath routes in both families, read back with
their lanes, narrowed, removed; not mistaken for competing routes; the layer-4 hash set in the
namespace only and put back.

ns node
veth pwl0 <-> pwl0p    (stand for lane 0's and lane 1's WireGuard links: this kernel has no
veth pwl1 <-> pwl1p     dummy, and WireGuard is not needed to route)
"""

from __future__ import annotations

import ipaddress
import pathlib

from podwire.agent import reconcile
from podwire.agent.datapath import routes as dp_routes
from podwire.agent.netlink import multipath
from podwire.agent.netlink import routes as nl_routes
from podwire.sandbox import netns as netns_mod

LANES = ("pwl0", "pwl1")
V4, V6 = ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd00:244:0:2::/64")
V4B = ipaddress.ip_network("10.244.3.0/24")
CLUSTER = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/56"))


def _node(factory: netns_mod.NetnsFactory) -> netns_mod.Netns:
    ns = factory.namespace("n")
    for dev in LANES:
        ns.ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
        for end in (dev, f"{dev}p"):
            ns.ip("link", "set", end, "up")
    return ns


def test_multipath_routes_in_both_families_read_back_with_their_lanes(
    netns: netns_mod.NetnsFactory,
) -> None:
    ns = _node(netns)
    table = dp_routes.Routes(LANES[0], netns=ns.name, devices=LANES)
    plan = reconcile.PathPlan(add=((V4, (0, 1)), (V6, (0, 1)), (V4B, (0,))))
    table.apply_paths(plan)
    table.apply_paths(plan)  # idempotent
    assert table.list_paths() == {V4: (0, 1), V6: (0, 1), V4B: (0,)}
    shown = ns.ip("route", "show", str(V4)).stdout
    assert "nexthop dev pwl0" in shown and "nexthop dev pwl1" in shown, shown
    shown6 = ns.ip("-6", "route", "show", str(V6)).stdout
    assert "dev pwl0" in shown6 and "dev pwl1" in shown6, shown6
    assert "dev pwl1" not in ns.ip("route", "show", str(V4B)).stdout

    # A peer that drops to one lane: its route narrows in place; one that goes: removed.
    table.apply_paths(reconcile.PathPlan(add=((V4, (0,)),), remove=(V6,)))
    assert table.list_paths() == {V4: (0,), V4B: (0,)}
    assert "nexthop" not in ns.ip("route", "show", str(V4)).stdout
    # A one-lane agent's reading sees the plain routes as its own (an upgrade changes nothing).
    assert sorted(dp_routes.Routes(LANES[0], netns=ns.name).list_routes(), key=str) == [V4, V4B]


def test_a_lane_device_that_goes_takes_its_multipath_route(netns: netns_mod.NetnsFactory) -> None:
    ns = _node(netns)
    table = dp_routes.Routes(LANES[0], netns=ns.name, devices=LANES)
    table.install_fail_closed(CLUSTER[:1])
    table.apply_paths(reconcile.PathPlan(add=((V4, (0, 1)),)))
    ns.ip("link", "del", "pwl1")
    # The kernel removes a route with any nexthop through a device that is unregistered: the
    # destination falls to the fail-closed backstop, and the next pass finds the route missing.
    assert table.list_paths() == {}
    got = ns.ip("route", "get", "10.244.2.7", check=False)
    assert got.returncode != 0 and "No route to host" in got.stderr, (got.stdout, got.stderr)


def test_our_multipath_routes_are_not_competing_routes(netns: netns_mod.NetnsFactory) -> None:
    ns = _node(netns)
    table = dp_routes.Routes(LANES[0], netns=ns.name, devices=LANES)
    table.apply_paths(reconcile.PathPlan(add=((V4, (0, 1)),)))
    dumped = nl_routes.dump(netns=ns.name)
    found = dp_routes.competing_routes(
        dumped, cluster=CLUSTER, own=(), device=LANES[0], lanes=LANES
    )
    assert found == []
    # Without knowing the lanes, the same route would be reported: the check is what tells.
    alone = dp_routes.competing_routes(dumped, cluster=CLUSTER, own=(), device=LANES[0])
    assert [str(r.dst) for r in alone] == [str(V4)]


def test_the_hash_is_set_in_the_namespace_only_and_put_back(
    netns: netns_mod.NetnsFactory,
) -> None:
    ns = _node(netns)
    host = {n: pathlib.Path("/proc/sys", n).read_text().strip() for n in multipath.SETTINGS}
    before = multipath.hash_by_flow(netns=ns.name)
    assert multipath.read(netns=ns.name) == {n: multipath.L4 for n in multipath.SETTINGS}
    assert {n: pathlib.Path("/proc/sys", n).read_text().strip() for n in multipath.SETTINGS} == host
    multipath.restore(before, netns=ns.name)
    assert multipath.read(netns=ns.name) == before
