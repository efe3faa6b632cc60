"""Lanes lowered at a restart, on the kernel datapath: two agents with lanes 2, one goes to 1.

tests/kernel/guest/lanes_lowering.py runs two nodes' agents (`app.assemble` with the real kernel
datapath, lanes: 2, fail-closed), each in its namespace of the VM, on one fake apiserver (no
apiserver runs in the VM; tests/support/agentfakes.py). Node a's agent is restarted with
lanes: 1 while flows run both ways: its lane 1 device and key file go, its route to b's pods
is narrowed to lane 0 in place (never missing), the multipath hash goes back to what it was.
Once b has read a's WireguardNode, its route to a's pods is single-path over lane 0 and flows
both ways arrive whole over lane 0's port pair; nothing crosses the underlay in clear.
"""

from __future__ import annotations

from typing import Any

import pytest

DEVICE, LANE1 = "podwire_wg0", "podwire_wg0_1"
FLOWS = {str(40000 + k) for k in range(8)}
CIDR = {"a": "10.244.1.0/24", "b": "10.244.2.0/24"}


@pytest.fixture(scope="module")
def facts(vm: Any) -> dict[str, Any]:
    got: dict[str, Any] = vm.python("lanes_lowering.py", timeout=840)
    ba, lanes = got["restart"]["ba"], got["ba_lane_unseen"]
    lost = {p: ba["sent"][p] - ba["got"].get(p, 0) for p, d in lanes.items() if d == LANE1}
    print(f"\nlanes lowered on the kernel datapath: scenario {got['_seconds']}s, a's restart "
          f"{got['restart_seconds']}s; route looked at {got['looks']} times, missing "
          f"{got['looks_missing']}; b's flows on its lane 1 until it read the change: lost "
          f"{lost} (refused at b {[ba['refused'][p] for p in lost]})")  # fmt: skip
    for key, value in got.items():
        if not key.startswith("_"):
            print(f"  {key}: {value}")
    return got


def _whole(flows: dict[str, Any]) -> None:
    """Every datagram of every flow arrived, none altered."""
    assert set(flows["sent"]) == FLOWS and all(n > 0 for n in flows["sent"].values()), flows
    assert not any(flows["refused"].values()), f"the backstop refused some: {flows}"
    assert flows["got"] == flows["sent"], flows
    assert flows["damaged"] == 0, flows


def _single_path(route: str, cidr: str) -> None:
    assert route.startswith(f"{cidr} dev {DEVICE} "), route
    assert "nexthop" not in route and LANE1 not in route, route


def test_two_lanes_carry_flows_both_ways_over_both_port_pairs(facts: dict[str, Any]) -> None:
    two = facts["two"]
    assert two["links"] == [f"{DEVICE} wireguard", f"{LANE1} wireguard"]
    for route in (two["route_a"], two["route_b"]):
        assert f"nexthop dev {DEVICE}" in route and f"nexthop dev {LANE1}" in route, route
    assert set(two["hash_a"].values()) == {1}, two["hash_a"]
    assert len(two["spec_lanes_a"]) == 1 and two["lane1_key_file"]
    assert two["ping"], "a's pod did not reach b's over the lanes"
    _whole(two["ab"])
    _whole(two["ba"])
    assert two["pairs"] == [[51820, 51820], [51821, 51821]]


def test_the_restarted_agent_with_one_lane_leaves_no_lane_1(facts: dict[str, Any]) -> None:
    one = facts["one"]
    assert one["links"] == [f"{DEVICE} wireguard"], "lane 1's device was left behind"
    assert not one["lane1_key_file"], "lane 1's key file was left behind"
    assert any(LANE1 in what for what in facts["retired"]), facts["retired"]
    _single_path(one["route_a"], CIDR["b"])
    assert one["hash_a"] == facts["hash_before"], "the multipath hash was not put back"
    assert facts["hash_end"] == facts["hash_before"]
    assert "lanes" not in one["spec_a"] and one["status_lanes_a"] == 1, one
    # The route was narrowed before the device went: never missing while the agent restarted.
    assert facts["looks"] > 0
    assert facts["looks_missing"] == 0, f"{facts['looks_missing']} of {facts['looks']} missing"


def test_once_the_other_node_has_read_it_flows_go_over_lane_0_alone(facts: dict[str, Any]) -> None:
    seen = facts["seen"]
    _single_path(seen["route_b"], CIDR["a"])
    assert seen["peers_b"][LANE1] == [], "b kept a's lane 1 as a peer"
    assert [p.split()[0] for p in seen["peers_b"][DEVICE]] == [seen["a_lane0_key"]]
    assert set(seen["hash_b"].values()) == {1}  # b keeps its two lanes
    assert seen["ping"]
    _whole(seen["ab"])
    _whole(seen["ba"])
    assert seen["pairs"] == [[51820, 51820]], "something still travels over lane 1's ports"


def test_while_lanes_are_lowered_a_s_flows_and_b_s_on_lane_0_arrive_whole(
    facts: dict[str, Any],
) -> None:
    restart = facts["restart"]
    # a's own flows never met the backstop (the route was narrowed before the device went):
    # none refused at the sender, all arrived, none altered.
    _whole(restart["ab"])
    # b's flows over its lane 0 arrive whole too. Those over its lane 1 reach a's port 51821,
    # where no device listens any more (dropped, encrypted), until b reads a's WireguardNode;
    # b's kernel may refuse a few of them (ENOKEY) while it moves them to lane 0, as it drops
    # a's lane 1 peer before it narrows the route.
    ba, lanes = restart["ba"], facts["ba_lane_unseen"]
    assert set(ba["sent"]) == FLOWS and ba["damaged"] == 0, ba
    assert set(lanes) == FLOWS and set(lanes.values()) <= {DEVICE, LANE1}, lanes
    for port, device in lanes.items():
        assert ba["got"].get(port, 0) <= ba["sent"][port], (port, ba)
        if device == DEVICE:
            assert ba["refused"][port] == 0 and ba["got"].get(port) == ba["sent"][port], (port, ba)


def test_nothing_crosses_the_underlay_in_clear(facts: dict[str, Any]) -> None:
    assert facts["clear"] == [], "pod traffic in clear on the underlay"
