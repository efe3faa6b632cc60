"""Lanes on the kernel datapath: two nodes with lanes: 2, kernel WireGuard on both ends.

tests/kernel/guest/lanes.py builds each side as the agent does with two lanes (a kernel device
and a port per lane, routes multipath over both, the layer-4 hash), sends 8 UDP flows between
the two "pods" and reports what it captured: on the underlay, the UDP port pairs; on the
receiving lanes' devices, which flow came on which lane. Then lane 1's device of the sender is
deleted and the flows sent again: they fail closed (over lane 0, or refused by the backstop: the
kernel removes a multipath route with any of its devices), never in clear; the lane brought back
as the agent's watchdog does carries them all again.
"""

from __future__ import annotations

from typing import Any

import pytest

FLOWS = {40000 + k for k in range(8)}


@pytest.fixture(scope="module")
def facts(vm: Any) -> dict[str, Any]:
    got: dict[str, Any] = vm.python("lanes.py", timeout=540)
    print(f"\nlanes on the kernel datapath: scenario {got['_seconds']}s; flows by lane "
          f"{got['flows_by_lane']}; UDP port pairs {got['pairs']}; after lane 1's device was "
          f"deleted: received {got['got_after_removal']}, routes via {got['lookups_after_removal']}; "
          f"lane back: received {sum(got['got_restored'].values())}")  # fmt: skip
    return got


def test_each_lane_is_a_kernel_device_with_its_own_peer(facts: dict[str, Any]) -> None:
    assert facts["backends"] == ["KernelBackend", "KernelBackend"]
    assert facts["link_kinds"] == ["wireguard", "wireguard"]
    b0, b1 = facts["b_keys"]
    assert facts["peers_by_lane"] == [[[b0, "192.0.2.2:51820"]], [[b1, "192.0.2.2:51821"]]]
    assert facts["paths"] == {"10.244.2.0/24": [0, 1]}
    lane0, lane1 = facts["devices"]
    assert f"nexthop dev {lane0}" in facts["route"] and f"nexthop dev {lane1}" in facts["route"]
    assert facts["hash_policy"]["net/ipv4/fib_multipath_hash_policy"] == 1
    assert facts["ping"], "the pods reach each other over the lanes"


def test_flows_travel_on_two_udp_port_pairs_each_on_one_lane(facts: dict[str, Any]) -> None:
    got = facts["got"]
    assert {int(p) for p in got} == FLOWS and all(n == 20 for n in got.values()), got
    lane0, lane1 = (set(ports) for ports in facts["flows_by_lane"])
    assert lane0 and lane1, f"the flows did not spread: {facts['flows_by_lane']}"
    assert not lane0 & lane1, "a flow changed lanes"
    assert lane0 | lane1 == FLOWS
    assert facts["pairs"] == [[51820, 51820], [51821, 51821]]


def test_a_lane_device_removed_fails_closed_without_leaking(facts: dict[str, Any]) -> None:
    assert facts["clear"] == [], "pod traffic in clear on the underlay"
    lane0, lane1 = facts["devices"]
    assert lane1 not in facts["route_after_removal"]
    # Every flow now goes over lane 0 (the kernel drops the dead nexthop) or nowhere.
    assert set(facts["lookups_after_removal"]) <= {lane0, "none"}
    moved = {int(p) for p in facts["got_after_removal"]}
    assert moved <= FLOWS
    if "none" in facts["lookups_after_removal"]:  # refused by the backstop, not routed past it
        assert "10.244.0.0/16" in facts["unreachable_after_removal"]


def test_the_lane_brought_back_carries_its_flows_again(facts: dict[str, Any]) -> None:
    assert facts["paths_restored"] == {"10.244.2.0/24": [0, 1]}
    got = facts["got_restored"]
    assert {int(p) for p in got} == FLOWS and all(n == 20 for n in got.values()), got


def test_the_multipath_hash_setting_is_put_back(facts: dict[str, Any]) -> None:
    assert facts["hash_after_restore"] == facts["hash_before"]
