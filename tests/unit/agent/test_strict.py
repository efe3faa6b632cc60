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

from podwire.agent import reconcile
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
