"""Traffic must not leave the tunnel by another way: the agent on fakes.

A Node whose pod CIDR lies outside the cluster's is refused like an overlap; with strictMode
the routes live in podwire's own table behind a rule, the backstop and the rule are checked and
put back on every pass, and a route that would take pod traffic past the device is reported.
"""

from __future__ import annotations

import dataclasses
import pathlib

import agentfakes
import pytest

from podwire.agent import controller, metrics, reconcile, reconciler
from podwire.agent.datapath import routes as dp_routes
from podwire.agent.netlink import routes as routes_nl
from podwire.api import wgnode

AgentHarness = agentfakes.AgentHarness
net = agentfakes.net


@pytest.fixture
def h(tmp_path: pathlib.Path) -> AgentHarness:
    harness = AgentHarness(tmp_path / "private.key")
    harness.start()
    return harness


def test_a_node_outside_the_cluster_range_is_refused_with_an_event(h: AgentHarness) -> None:
    n2 = agentfakes.other_node(2)
    rogue = dataclasses.replace(agentfakes.other_node(4), cidrs=("10.96.0.0/24",))
    h.list(n2, rogue)
    h.step()
    assert set(h.peers()) == {n2.public_key}
    assert h.routes.routes == n2.networks
    assert h.kube_events(reconcile.POD_CIDR_OUTSIDE_CLUSTER) == ["n4"]
    status, _, message = h.conditions()[wgnode.PEERS_REFUSED]
    assert status == "True" and "n4" in message


def test_a_node_whose_pod_cidr_covers_a_node_address_is_refused(h: AgentHarness) -> None:
    n2 = agentfakes.other_node(2)
    # n3's pod CIDR holds n2's underlay address (as if node IPAM and the underlay collided).
    n2 = dataclasses.replace(n2, address="10.244.3.2")
    n3 = agentfakes.other_node(3)
    h.list(n2, n3)
    h.step()
    assert set(h.peers()) == {n2.public_key}
    assert h.kube_events(reconcile.POD_CIDR_COVERS_NODE_ADDRESS) == ["n3"]
    assert h.conditions()[wgnode.PEERS_REFUSED][0] == "True"


def test_a_node_whose_pod_cidr_covers_the_apiserver_is_refused(tmp_path: pathlib.Path) -> None:
    """The apiserver the agent talks to (its kubeconfig's or in-cluster address) is guarded
    like a node's: routed into the tunnel, the agents would lose the apiserver."""
    h = AgentHarness(tmp_path / "private.key", apiserver="https://10.244.3.7:6443")
    h.start()
    n2, n3 = agentfakes.other_node(2), agentfakes.other_node(3)  # n3 holds 10.244.3.0/24
    h.list(n2, n3)
    h.step()
    assert set(h.peers()) == {n2.public_key}
    assert h.kube_events(reconcile.POD_CIDR_COVERS_NODE_ADDRESS) == ["n3"]
    (event,) = (e for e in h.api.events if e["reason"] == reconcile.POD_CIDR_COVERS_NODE_ADDRESS)
    assert "covers 10.244.3.7, an address of the apiserver" in event["message"]
    assert h.conditions()[wgnode.PEERS_REFUSED][0] == "True"


def _metric(h: AgentHarness, name: str) -> float | None:
    for family in metrics.AgentCollector(h.agent).collect():
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_strict_mode_guards_the_table_and_rules_on_every_pass(h: AgentHarness) -> None:
    n2 = agentfakes.other_node(2)
    h.list(n2)
    h.step()
    assert h.routes.strict and h.agent.datapath.strict_mode
    assert {
        "unreachable 10.244.0.0/16 main",
        "unreachable 10.244.0.0/16 podwire",
        "throw 10.244.1.0/24 podwire",
        "rule to 10.244.0.0/16 lookup podwire",
        "rule from 10.244.0.0/16 to 10.244.1.0/24 blackhole",
    } == h.routes.guarded
    assert h.kube_events("RoutingRestored") == []  # the first pass puts them in place

    # Someone deletes the rule and the backstop by hand: the next pass puts them back, says so.
    h.routes.guarded -= {"rule to 10.244.0.0/16 lookup podwire", "unreachable 10.244.0.0/16 main"}
    h.step(woke=False)
    h.advance(400)
    h.step()
    assert "rule to 10.244.0.0/16 lookup podwire" in h.routes.guarded
    assert "unreachable 10.244.0.0/16 main" in h.routes.guarded
    assert h.kube_events("RoutingRestored") == ["n1"]
    assert h.agent.reconciler.outcome.restored == 1


def test_a_competing_route_is_an_event_a_metric_and_the_condition(h: AgentHarness) -> None:
    n2 = agentfakes.other_node(2)
    h.list(n2)
    h.step()
    assert _metric(h, "podwire_competing_routes") == 0
    h.routes.foreign = ["10.244.2.7/32 dev eth0 table main proto 3"]
    h.nodes.put(n2.node())  # any change runs a pass, but the last look is recent
    h.step()
    assert h.kube_events("CompetingRoute") == []
    h.advance(reconciler.COMPETING_SCAN_INTERVAL)
    h.nodes.put(n2.node())
    h.step()
    assert h.kube_events("CompetingRoute") == ["n1"]
    assert _metric(h, "podwire_competing_routes") == 1
    status, reason, message = h.conditions()[wgnode.ENCRYPTED]
    assert (status, reason) == ("True", "CompetingRouteOverridden")
    assert "10.244.2.7/32" in message
    h.nodes.put(n2.node())
    h.step()
    assert h.kube_events("CompetingRoute") == ["n1"]  # once, not on every pass
    h.routes.foreign = []
    h.advance(reconciler.COMPETING_SCAN_INTERVAL)
    h.nodes.put(n2.node())
    h.step()
    assert _metric(h, "podwire_competing_routes") == 0
    assert h.conditions()[wgnode.ENCRYPTED][1] == "Encrypted"


def test_without_strict_mode_a_competing_route_means_not_encrypted(
    tmp_path: pathlib.Path,
) -> None:
    h = AgentHarness(tmp_path / "private.key")
    h.routes.strict = False
    h.start()
    h.routes.foreign = ["10.244.2.7/32 dev eth0 table main proto 3"]
    h.list(agentfakes.other_node(2))
    h.step()
    assert not any(g.startswith("rule") for g in h.routes.guarded)
    status, reason, _ = h.conditions()[wgnode.ENCRYPTED]
    assert (status, reason) == ("False", "CompetingRoute")


def _route(
    dst: str, *, table: int = 254, kind: str = "unicast", dev: str | None = "eth0"
) -> routes_nl.Route:
    return routes_nl.Route(net(dst), table, kind, 3, dev)


COMPETING_CASES = [
    ("a remote pod /32 in main", _route("10.244.2.7/32"), True),
    ("a remote pod CIDR in another table", _route("10.244.2.0/24", table=100), True),
    ("between the cluster range and a node's", _route("10.244.0.0/20"), True),
    ("the whole cluster range elsewhere", _route("10.244.0.0/16", dev="cbr0"), True),
    ("through our device", _route("10.244.2.0/24", dev="podwire_wg0"), False),
    ("our own table", _route("10.244.2.7/32", table=routes_nl.TABLE), False),
    ("the node's own pods", _route("10.244.1.0/24", dev="cbr0"), False),
    ("a local pod /32", _route("10.244.1.9/32", dev="veth1"), False),
    ("the backstop", _route("10.244.0.0/16", kind="unreachable", dev=None), False),
    ("a throw", _route("10.244.1.0/24", kind="throw", dev=None), False),
    ("the default route", _route("0.0.0.0/0"), False),
    ("wider than the cluster range", _route("10.0.0.0/8"), False),
    ("an IPv6 remote pod", _route("fd00:10:244:2::7/128"), True),
    ("another family's range", _route("fd00:99::/64"), False),
]


@pytest.mark.parametrize(
    ("route", "competes"),
    [case[1:] for case in COMPETING_CASES],
    ids=[case[0] for case in COMPETING_CASES],
)
def test_which_routes_compete(route: routes_nl.Route, competes: bool) -> None:
    found = dp_routes.competing_routes(
        [route],
        cluster=(net("10.244.0.0/16"), net("fd00:10:244::/56")),
        own=(net("10.244.1.0/24"), net("fd00:10:244:1::/64")),
        device="podwire_wg0",
    )
    assert found == ([route] if competes else [])


def test_every_pass_guards_the_backstop_but_reads_all_routes_only_now_and_then(
    h: AgentHarness,
) -> None:
    n2 = agentfakes.other_node(2)
    h.list(n2)
    h.step()
    guards, scans = h.routes.guards, h.routes.competing_scans
    for _ in range(5):
        h.nodes.put(n2.node())
        h.step()
    assert h.routes.guards == guards + 5  # the backstop and rules: every pass
    assert h.routes.competing_scans == scans  # every route of the node: not every pass
    h.advance(reconciler.COMPETING_SCAN_INTERVAL)
    h.nodes.put(n2.node())
    h.step()
    assert h.routes.competing_scans == scans + 1


def test_an_idle_node_puts_its_backstop_back_between_passes(h: AgentHarness) -> None:
    h.list(agentfakes.other_node(2))
    h.step()
    h.routes.guarded.discard("rule to 10.244.0.0/16 lookup podwire")
    assert not h.step(woke=False)  # no pass owed, so none runs ...
    h.advance(controller.GUARD_INTERVAL)
    assert not h.step(woke=False)
    assert "rule to 10.244.0.0/16 lookup podwire" in h.routes.guarded  # ... but the guard does
    assert h.kube_events("RoutingRestored") == ["n1"]


def test_until_its_own_node_is_known_the_guard_changes_nothing(h: AgentHarness) -> None:
    # A restarted agent runs passes before its watch has listed its own Node: taking the
    # throw for its pods (or their inbound rule) away then would cut traffic to local pods.
    h.list(agentfakes.other_node(2))
    h.step()
    kept = {g for g in h.routes.guarded if g.startswith(("throw", "rule from"))}
    assert kept, h.routes.guarded
    h.nodes.delete(h.NODE)
    h.step()
    assert kept <= h.routes.guarded
