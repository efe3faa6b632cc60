"""The local API's answers, from an agent assembled on fakes (`agentfakes.AgentHarness`)."""

from __future__ import annotations

import pathlib

import agentfakes
import grpc
import pytest

from podwire.agent import api, wgdevice
from podwire.api import wgnode
from podwire.api.podwire.v1 import agent_pb2

AgentHarness = agentfakes.AgentHarness


@pytest.fixture
def n2() -> agentfakes.OtherNode:
    return agentfakes.other_node(2)


@pytest.fixture
def h(tmp_path: pathlib.Path, n2: agentfakes.OtherNode) -> AgentHarness:
    harness = AgentHarness(tmp_path / "private.key")
    harness.start()
    harness.list(n2)
    harness.step()
    return harness


class AbortingContext:
    """What grpc gives a servicer, as far as `abort` goes: it raises."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.RpcError(details)


def test_status_reports_the_node_and_its_device(h: AgentHarness) -> None:
    status = api.Servicer(h.agent).GetStatus(None, None)
    assert status.node_name == AgentHarness.NODE
    assert status.public_key == h.agent.keys.public_key
    assert status.datapath == agent_pb2.DATAPATH_USERSPACE
    assert status.mtu == 1420
    assert status.peer_count == 1
    assert status.nodes_synced and status.wgnodes_synced


def test_status_reports_the_conditions(h: AgentHarness) -> None:
    status = api.Servicer(h.agent).GetStatus(None, None)
    conds = {c.type: c for c in status.conditions}
    assert set(conds) == set(wgnode.CONDITION_TYPES)
    assert conds[wgnode.READY].status
    assert not conds[wgnode.PEERS_REFUSED].status
    assert conds[wgnode.PEERS_PROGRAMMED].reason == "Programmed"
    assert conds[wgnode.READY].last_transition_time.seconds > 0


def test_status_reports_one_health_line_per_component(h: AgentHarness) -> None:
    status = api.Servicer(h.agent).GetStatus(None, None)
    names = [c.name for c in status.components]
    assert names == [c.name for c in h.agent.components()]
    assert all(c.ok and c.message for c in status.components)


def test_status_reports_an_unhealthy_component(h: AgentHarness) -> None:
    h.backend.fail_always = OSError("netlink: device busy")
    h.join(agentfakes.other_node(3))
    h.step()
    status = api.Servicer(h.agent).GetStatus(None, None)
    health = {c.name: c for c in status.components}
    assert not health["reconciler"].ok
    assert "netlink: device busy" in health["reconciler"].message
    assert status.last_reconcile_error == "netlink: device busy"


def test_status_tells_when_the_key_in_use_was_made_before_any_rotation(h: AgentHarness) -> None:
    status = api.Servicer(h.agent).GetStatus(None, None)
    made = h.agent.cfg.key_path.stat().st_mtime
    assert status.key_rotated_at.seconds == int(made)


def test_status_reports_key_rotated_at_after_a_rotation(h: AgentHarness) -> None:
    public, wall = h.controller.rotate_key()
    status = api.Servicer(h.agent).GetStatus(None, None)
    assert status.public_key == public
    assert status.key_rotated_at.seconds == int(wall)


def test_list_peers_reports_the_device_peers(h: AgentHarness, n2: agentfakes.OtherNode) -> None:
    (peer,) = api.Servicer(h.agent).ListPeers(None, None).peers
    assert peer.node_name == "n2"
    assert peer.public_key == n2.public_key
    assert peer.endpoint == str(n2.endpoint)
    assert list(peer.allowed_ips) == list(n2.cidrs)


def test_list_peers_reports_the_keepalive_set_on_the_device(
    h: AgentHarness, n2: agentfakes.OtherNode
) -> None:
    h.backend.apply([wgdevice.PeerChange(n2.public_key, persistent_keepalive=25, update_only=True)])
    (peer,) = api.Servicer(h.agent).ListPeers(None, None).peers
    assert peer.persistent_keepalive_interval == 25


def test_list_peers_without_a_device_answers_unavailable(h: AgentHarness) -> None:
    h.backend.lose()
    context = AbortingContext()
    with pytest.raises(grpc.RpcError):
        api.Servicer(h.agent).ListPeers(None, context)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "no such device" in context.details
