"""The agent's control loop driven by hand: the whole agent assembled on fakes, one turn at a time.

`agentfakes.AgentHarness` assembles the real components with an in-memory device, routing
table, watch sources and apiserver, and a fake clock; each test calls `step` and moves the clock,
and asserts what a user would notice: peers on the device, routes, Events, the WireguardNode's
status, /readyz.
"""

from __future__ import annotations

import pathlib
import time

import agentfakes
import pytest

from podwire.agent import keys, metrics, publisher, wgdevice
from podwire.api import wgnode

AgentHarness = agentfakes.AgentHarness
OtherNode = agentfakes.OtherNode
other_node = agentfakes.other_node


@pytest.fixture
def h(tmp_path: pathlib.Path) -> AgentHarness:
    harness = AgentHarness(tmp_path / "private.key")
    harness.start()
    return harness


@pytest.fixture
def n2() -> OtherNode:
    return other_node(2)


@pytest.fixture
def n3() -> OtherNode:
    return other_node(3)


@pytest.fixture
def synced(h: AgentHarness, n2: OtherNode, n3: OtherNode) -> AgentHarness:
    """An agent that has published, listed n2 and n3, and programmed them."""
    h.list(n2, n3)
    h.step()
    assert set(h.peers()) == {n2.public_key, n3.public_key}
    h.local_events()
    return h


def readyz(h: AgentHarness) -> tuple[int, str]:
    return metrics.readiness(h.agent)


# 1. First sync, fail-closed first


def test_fail_closed_is_installed_before_the_device_exists(tmp_path: pathlib.Path) -> None:
    h = AgentHarness(tmp_path / "private.key")
    h.agent.datapath.start()
    assert h.routes.fail_closed == [agentfakes.net(AgentHarness.CLUSTER_CIDR)]
    assert not h.backend.exists
    assert h.underlay == []


def test_first_sync_runs_fail_closed_then_device_then_peers_then_routes(
    h: AgentHarness, n2: OtherNode
) -> None:
    h.list(n2)
    h.step()
    assert h.routes.log[:2] == ["fail_closed", "device"]
    assert h.routes.log.index("peers") < h.routes.log.index("routes")
    assert h.underlay == [AgentHarness.ADDRESS]


def test_first_sync_publishes_the_own_wireguardnode_with_the_key(h: AgentHarness) -> None:
    h.step()
    own = h.api.wgnodes[AgentHarness.NODE]
    assert own["spec"] == {"publicKey": h.agent.keys.public_key, "listenPort": 51871}
    assert own["metadata"]["ownerReferences"][0]["uid"] == "uid-n1"
    assert h.backend.private_key == h.agent.keys.key.raw
    assert h.backend.listen_port == 51871


def test_first_sync_programs_peers_and_routes_once_both_sources_list(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    h.step()
    assert h.peers() == {}
    h.list(n2, n3)
    h.step()
    peers = h.peers()
    assert peers[n2.public_key].endpoint == n2.endpoint
    assert set(peers[n2.public_key].allowed_ips) == n2.networks
    assert set(peers[n3.public_key].allowed_ips) == n3.networks
    assert h.routes.routes == n2.networks | n3.networks


def test_readiness_turns_200_after_the_first_sync(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    code, text = readyz(h)
    assert code == 503
    assert "not ready: watches: nodes: listing" in text
    h.list(n2, n3)
    h.step()
    code, text = readyz(h)
    assert code == 200, text
    assert text.startswith("ready\n")


def test_first_sync_writes_the_conditions(synced: AgentHarness) -> None:
    conds = synced.conditions()
    for type in (wgnode.READY, wgnode.KEY_PUBLISHED, wgnode.PEERS_PROGRAMMED, wgnode.ENCRYPTED):
        assert conds[type][0] == "True", (type, conds[type])
    assert conds[wgnode.PEERS_REFUSED][0] == "False"


def test_status_shows_the_endpoint_and_pod_cidrs_in_use(synced: AgentHarness) -> None:
    status = synced.api.wgnodes[AgentHarness.NODE]["status"]
    assert status["endpoint"] == "192.0.2.1:51871"
    assert status["podCIDRs"] == [AgentHarness.CIDR]
    assert status["peers"] == 2
    assert status["datapath"] == "userspace"


def test_the_status_is_not_written_again_when_nothing_changed(synced: AgentHarness) -> None:
    written = len(synced.api.status_patches)
    synced.step()
    synced.advance(1)
    synced.step()
    assert len(synced.api.status_patches) == written


# 2. Nodes joining, changing and leaving


def test_a_node_joining_is_programmed(synced: AgentHarness) -> None:
    n4 = other_node(4)
    synced.join(n4)
    synced.step()
    assert synced.peers()[n4.public_key].endpoint == n4.endpoint
    assert n4.networks <= synced.routes.routes
    assert ("Normal", "PeerAdded") in synced.local_events()


def test_a_node_without_its_wireguardnode_yet_is_not_a_peer(synced: AgentHarness) -> None:
    n4 = other_node(4)
    synced.nodes.put(n4.node())
    synced.step()
    assert n4.public_key not in synced.peers()
    synced.wgnodes.put(n4.wgnode())
    synced.step()
    assert n4.public_key in synced.peers()


def test_a_new_internal_ip_moves_the_endpoint(synced: AgentHarness, n2: OtherNode) -> None:
    n2.address = "192.0.2.102"
    synced.nodes.put(n2.node())
    synced.step()
    assert synced.peers()[n2.public_key].endpoint == wgdevice.make_endpoint("192.0.2.102", 51871)


def test_a_new_listen_port_moves_the_endpoint(synced: AgentHarness, n2: OtherNode) -> None:
    n2.port = 51999
    synced.wgnodes.put(n2.wgnode())
    synced.step()
    assert synced.peers()[n2.public_key].endpoint == wgdevice.make_endpoint(n2.address, 51999)


def test_new_pod_cidrs_move_allowed_ips_and_routes(synced: AgentHarness, n2: OtherNode) -> None:
    old = n2.networks
    n2.cidrs = ("10.244.20.0/24", "10.244.21.0/24")
    synced.nodes.put(n2.node())
    synced.step()
    assert set(synced.peers()[n2.public_key].allowed_ips) == n2.networks
    assert n2.networks <= synced.routes.routes
    assert not old & synced.routes.routes


def test_a_node_leaving_is_removed(synced: AgentHarness, n2: OtherNode, n3: OtherNode) -> None:
    synced.leave(n3)
    synced.step()
    assert set(synced.peers()) == {n2.public_key}
    assert synced.routes.routes == n2.networks
    assert ("Normal", "PeerRemoved") in synced.local_events()


def test_a_node_whose_wireguardnode_is_deleted_is_removed(
    synced: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    synced.wgnodes.delete(n3.name)
    synced.step()
    assert set(synced.peers()) == {n2.public_key}


# 3. Nothing removed before both sources synced, or while the apiserver is away


def stale_peer(h: AgentHarness, other: OtherNode) -> None:
    """A peer (and its route) left on the device by a previous agent."""
    h.backend.apply(
        [
            wgdevice.PeerChange(
                other.public_key,
                endpoint=other.endpoint,
                allowed_ips=tuple(other.networks),
                replace_allowed_ips=True,
            )
        ]
    )
    h.routes.routes |= other.networks


def test_nothing_is_removed_before_both_sources_listed(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    stale_peer(h, n3)
    h.list_nodes(n2)  # the WireguardNodes have not listed yet
    h.step()
    assert n3.public_key in h.peers()
    assert n3.networks <= h.routes.routes
    h.list(n2)
    h.step()
    assert set(h.peers()) == {n2.public_key}
    assert h.routes.routes == n2.networks


def test_a_peer_is_kept_while_the_apiserver_is_away(
    synced: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    synced.nodes.fail("watch nodes: connection refused")
    synced.leave(n3)
    synced.step()
    assert n3.public_key in synced.peers()
    assert n3.networks <= synced.routes.routes
    code, text = readyz(synced)
    assert code == 503
    assert "not ready: watches: nodes: watch nodes: connection refused" in text


def test_a_peer_gone_meanwhile_is_removed_when_the_watch_relists(
    synced: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    synced.nodes.fail("watch nodes: connection refused")
    synced.leave(n3)
    synced.step()
    synced.list(n2)
    synced.step()
    assert set(synced.peers()) == {n2.public_key}
    assert readyz(synced)[0] == 200


def test_peers_programmed_is_false_while_the_apiserver_is_away(synced: AgentHarness) -> None:
    synced.wgnodes.fail("watch wgnodes: connection refused")
    synced.step()
    assert synced.conditions()[wgnode.READY][0] == "True", "a short outage is not written"
    synced.advance(publisher.QUIET_WATCH_OUTAGE)
    synced.step()
    status, reason, _ = synced.conditions()[wgnode.PEERS_PROGRAMMED]
    assert (status, reason) == ("False", "WaitingForSync")
    assert synced.conditions()[wgnode.READY][0] == "False"


# 4. Duplicate keys and overlapping pod CIDRs refused


def test_a_duplicate_public_key_is_refused_on_both_nodes(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    n3.public_key = n2.public_key
    h.list(n2, n3)
    for _ in range(3):
        h.step()
    assert h.peers() == {}
    assert h.routes.routes == set()
    assert sorted(h.kube_events("DuplicatePublicKey")) == ["n2", "n3"]
    assert {e["type"] for e in h.api.events} == {"Warning"}
    assert h.local_events().count(("Warning", "DuplicatePublicKey")) == 2
    status, _, message = h.conditions()[wgnode.PEERS_REFUSED]
    assert status == "True"
    assert "n2" in message and "n3" in message


def test_a_duplicate_public_key_fixed_is_programmed_and_the_condition_clears(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    n3.public_key = n2.public_key
    h.list(n2, n3)
    h.step()
    n3.public_key = other_node(3).public_key
    h.wgnodes.put(n3.wgnode())
    h.step()
    assert set(h.peers()) == {n2.public_key, n3.public_key}
    assert h.conditions()[wgnode.PEERS_REFUSED][0] == "False"
    assert len(h.kube_events("DuplicatePublicKey")) == 2


def test_a_node_claiming_the_own_key_is_refused(h: AgentHarness, n2: OtherNode) -> None:
    h.step()  # the own key is published
    n2.public_key = h.agent.keys.public_key
    h.list(n2)
    h.step()
    assert h.peers() == {}
    assert h.kube_events("DuplicatePublicKey") == ["n2"]


def test_overlapping_pod_cidrs_are_refused_on_both_nodes(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    n3.cidrs = ("10.244.2.0/23",)  # holds n2's 10.244.2.0/24
    h.list(n2, n3)
    for _ in range(3):
        h.step()
    assert h.peers() == {}
    assert h.routes.routes == set()
    assert sorted(h.kube_events("OverlappingPodCIDR")) == ["n2", "n3"]
    status, _, message = h.conditions()[wgnode.PEERS_REFUSED]
    assert status == "True"
    assert "n2" in message and "n3" in message


def test_overlapping_pod_cidrs_fixed_are_programmed_and_the_condition_clears(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    n3.cidrs = ("10.244.2.0/23",)
    h.list(n2, n3)
    h.step()
    n3.cidrs = ("10.244.3.0/24",)
    h.nodes.put(n3.node())
    h.step()
    assert set(h.peers()) == {n2.public_key, n3.public_key}
    assert h.routes.routes == n2.networks | n3.networks
    assert h.conditions()[wgnode.PEERS_REFUSED] == ("False", "NoneRefused", "")


def test_a_refusal_that_returns_is_reported_again(
    h: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    n3.cidrs = ("10.244.2.0/23",)
    h.list(n2, n3)
    h.step()
    h.nodes.put(other_node(3).node())
    h.step()
    h.nodes.put(n3.node())
    h.step()
    assert sorted(h.kube_events("OverlappingPodCIDR")) == ["n2", "n2", "n3", "n3"]


# 5. Publishing


def test_publish_retries_a_conflict(h: AgentHarness) -> None:
    h.api.conflicts = 2
    h.list()
    h.step()
    assert h.api.conflicts == 0
    assert h.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"] == h.agent.keys.public_key
    assert h.conditions()[wgnode.KEY_PUBLISHED][0] == "True"


def test_publish_replaces_a_stale_key_through_conflicts(h: AgentHarness) -> None:
    stale = other_node(9).public_key
    h.api.wgnodes[AgentHarness.NODE] = agentfakes.wgnode_obj(AgentHarness.NODE, stale)
    h.api.conflicts = 2
    h.step()
    assert h.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"] == h.agent.keys.public_key
    assert h.api.writes == [f"replace {AgentHarness.NODE}"]


def test_a_restart_with_the_same_key_writes_no_spec(h: AgentHarness) -> None:
    h.api.wgnodes[AgentHarness.NODE] = agentfakes.wgnode_obj(
        AgentHarness.NODE, h.agent.keys.public_key
    )
    h.step()
    assert h.api.writes == []
    assert h.agent.publisher.published


def test_a_failed_publish_is_retried_until_it_gets_through(h: AgentHarness, n2: OtherNode) -> None:
    h.list(n2)
    h.api.down = True
    for _ in range(3):
        h.step(woke=False)
        h.advance(1)
    assert h.api.wgnodes == {}
    conds = {c.type: c for c in h.agent.publisher.current_conditions()}
    assert conds[wgnode.KEY_PUBLISHED].status == "False"
    assert "connection refused" in conds[wgnode.KEY_PUBLISHED].message
    code, text = readyz(h)
    assert code == 503
    assert "publisher: publishing the WireguardNode: connection refused" in text
    h.api.down = False
    h.step(woke=False)
    assert h.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"] == h.agent.keys.public_key
    h.step()  # the watch delivered the object: the status follows
    assert h.conditions()[wgnode.KEY_PUBLISHED][0] == "True"
    assert readyz(h)[0] == 200


def test_peers_are_programmed_while_the_publish_fails(h: AgentHarness, n2: OtherNode) -> None:
    h.api.down = True
    h.list(n2)
    h.step()
    assert n2.public_key in h.peers()


# 6. The device lost and brought back


def test_a_lost_device_is_restored_with_key_and_port(synced: AgentHarness) -> None:
    synced.backend.lose()
    synced.step(woke=False)
    assert synced.backend.exists
    assert synced.backend.private_key == synced.agent.keys.key.raw
    assert synced.backend.listen_port == 51871
    assert synced.agent.watchdog.restarts == 1
    assert ("Warning", "DeviceLost") in synced.local_events()


def test_a_restored_device_gets_every_peer_and_route_again(
    synced: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    reads = synced.backend.reads
    synced.backend.lose()
    assert synced.step(woke=False)
    assert synced.backend.reads == reads + 1
    assert set(synced.peers()) == {n2.public_key, n3.public_key}
    assert set(synced.peers()[n2.public_key].allowed_ips) == n2.networks
    assert synced.routes.routes == n2.networks | n3.networks


def test_a_restored_device_greets_its_peers(
    synced: AgentHarness, n2: OtherNode, n3: OtherNode
) -> None:
    synced.backend.applied.clear()
    synced.backend.lose()
    synced.step(woke=False)
    assert sorted(synced.backend.greeted()) == sorted([n2.public_key, n3.public_key])
    # The greeting switches the keepalive on for one packet, then off again.
    assert all(p.persistent_keepalive == 0 for p in synced.peers().values())


def test_an_unchanged_device_is_not_restored(synced: AgentHarness) -> None:
    synced.advance(1)
    assert not synced.step(woke=False)
    assert synced.agent.watchdog.restarts == 0


# 7. A backend error retried with backoff


def test_a_failing_backend_is_retried_after_1_2_then_4_seconds(
    h: AgentHarness, n2: OtherNode
) -> None:
    h.list(n2)
    h.backend.fail_always = OSError("netlink: device busy")
    assert h.step()
    for wait in (1.0, 2.0, 4.0):
        h.advance(wait - 0.1)
        assert not h.step(), f"a pass ran before {wait} s had passed"
        h.advance(0.1)
        assert h.step(), f"no pass after {wait} s"
    assert h.agent.reconciler.outcome.errors == 4
    assert h.agent.reconciler.outcome.failures_in_a_row == 4


def test_readiness_says_why_while_passes_fail(h: AgentHarness, n2: OtherNode) -> None:
    h.list(n2)
    h.backend.fail_always = OSError("netlink: device busy")
    h.step()
    code, text = readyz(h)
    assert code == 503
    assert "not ready: reconciler: last pass failed: netlink: device busy" in text
    assert "controller: not ok: 1 passes failed in a row" in text
    status, reason, message = h.conditions()[wgnode.PEERS_PROGRAMMED]
    assert (status, reason, message) == ("False", "ReconcileFailed", "netlink: device busy")


def test_the_next_due_pass_after_the_failure_clears_succeeds(
    h: AgentHarness, n2: OtherNode
) -> None:
    h.list(n2)
    h.backend.fail_always = OSError("netlink: device busy")
    h.step()
    h.advance(1)
    h.step()
    h.backend.fail_always = None
    h.advance(1.9)
    assert not h.step()
    h.advance(0.1)
    assert h.step()
    assert n2.public_key in h.peers()
    assert h.agent.reconciler.outcome.failures_in_a_row == 0
    assert readyz(h)[0] == 200


def test_a_restored_device_is_programmed_at_once_despite_the_backoff(
    h: AgentHarness, n2: OtherNode
) -> None:
    h.list(n2)
    h.backend.fail_always = OSError("netlink: device busy")
    for wait in (0.0, 1.0, 2.0):
        h.advance(wait)
        h.step()
    h.backend.fail_always = None
    h.backend.lose()
    assert h.step(woke=False)  # the 4 s wait is not kept
    assert n2.public_key in h.peers()


def test_a_failure_after_a_restored_device_waits_the_shortest_backoff(
    h: AgentHarness, n2: OtherNode
) -> None:
    h.list(n2)
    h.backend.fail_always = OSError("netlink: device busy")
    for wait in (0.0, 1.0, 2.0):
        h.advance(wait)
        h.step()
    h.backend.lose()
    assert h.step(woke=False)  # restored; the pass still fails
    h.advance(1)
    assert h.step(), "after a restored device, a failed pass should wait 1 s again, not 8 s"


# 8. Key rotation


def test_rotation_puts_the_new_key_on_the_device_and_publishes_it(
    synced: AgentHarness, tmp_path: pathlib.Path
) -> None:
    old = synced.agent.keys.public_key
    public, _ = synced.controller.rotate_key()
    assert public != old
    assert synced.agent.keys.public_key == public
    assert synced.backend.private_key == synced.agent.keys.key.raw
    assert synced.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"] == public
    assert keys.load(tmp_path / "private.key").public_key_b64() == public
    assert ("Normal", "KeyRotated") in synced.local_events()


def test_rotation_sets_key_rotated_at_after_the_next_pass(synced: AgentHarness) -> None:
    synced.advance(30)
    _, wall = synced.controller.rotate_key()
    assert synced.wakeup.is_set()
    assert synced.step()
    status = synced.api.wgnodes[AgentHarness.NODE]["status"]
    assert status["keyRotatedAt"] == wgnode.format_time(wall)


def test_rotation_keeps_the_peers(synced: AgentHarness, n2: OtherNode, n3: OtherNode) -> None:
    synced.controller.rotate_key()
    synced.step()
    assert set(synced.peers()) == {n2.public_key, n3.public_key}


def test_a_rotation_not_published_is_published_by_a_later_step(synced: AgentHarness) -> None:
    synced.api.down = True
    with pytest.raises(RuntimeError, match="not published yet"):
        synced.controller.rotate_key()
    assert synced.conditions()[wgnode.KEY_PUBLISHED][0] == "True"  # the old status stands
    synced.api.down = False
    synced.step(woke=False)
    public = synced.agent.keys.public_key
    assert synced.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"] == public


# 9. The resync period


@pytest.fixture
def resyncing(tmp_path: pathlib.Path, n2: OtherNode) -> AgentHarness:
    h = AgentHarness(tmp_path / "private.key", resync_period=60.0)
    h.start()
    h.list(n2)
    h.step()
    return h


def test_passes_between_resyncs_use_the_record_not_the_device(resyncing: AgentHarness) -> None:
    reads = resyncing.backend.reads
    n4 = other_node(4)
    resyncing.join(n4)
    resyncing.advance(10)
    assert resyncing.step()
    assert n4.public_key in resyncing.peers()
    assert resyncing.backend.reads == reads


def test_no_pass_runs_before_the_resync_period_without_an_event(
    resyncing: AgentHarness,
) -> None:
    reads = resyncing.backend.reads
    resyncing.advance(59)
    assert not resyncing.step(woke=False)
    assert resyncing.backend.reads == reads


def test_the_resync_reads_the_device_back_in_full(resyncing: AgentHarness) -> None:
    reads = resyncing.backend.reads
    resyncing.advance(60)
    assert resyncing.step(woke=False)
    assert resyncing.backend.reads == reads + 1


def test_the_resync_restores_a_peer_removed_behind_the_agents_back(
    resyncing: AgentHarness, n2: OtherNode
) -> None:
    resyncing.backend.apply([wgdevice.PeerChange(n2.public_key, remove=True)])
    resyncing.advance(1)
    resyncing.step()
    assert n2.public_key not in resyncing.peers()  # the record still has it
    resyncing.advance(60)  # the period counts from the last pass
    assert resyncing.step(woke=False)
    assert set(resyncing.peers()[n2.public_key].allowed_ips) == n2.networks


# 10. The loop survives its own bugs


def test_an_unexpected_error_in_a_turn_does_not_end_the_loop(
    synced: AgentHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that raises (a bug, a malformed object) is logged and the loop goes on: a dead
    loop would leave the node's peers frozen while /healthz still answers."""
    calls = {"n": 0}
    real = synced.agent.publisher.write_status

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise AttributeError("a bug in writing the status")
        real()

    monkeypatch.setattr(synced.agent.publisher, "write_status", flaky)
    passes = synced.agent.reconciler.outcome.passes
    synced.controller.start()
    try:
        deadline = time.monotonic() + 10
        while synced.agent.reconciler.outcome.passes < passes + 2 and time.monotonic() < deadline:
            synced.controller.wake()
            time.sleep(0.05)
    finally:
        synced.controller.stop()
    assert calls["n"] >= 2, "the loop went on after the error"
    assert synced.agent.reconciler.outcome.passes >= passes + 2


def test_a_node_that_joins_later_is_greeted_too(synced: AgentHarness) -> None:
    """Both ends greet: a new node's own greeting reaches this node before this node knows its
    key and is dropped, and WireGuard retries only after 5 s; this node's greeting, sent as it
    adds the newcomer, makes the session at once (seen as 5 s without traffic between two
    freshly started nodes)."""
    synced.backend.applied.clear()
    n4 = other_node(4)
    synced.join(n4)
    synced.step()
    assert synced.backend.greeted() == [n4.public_key]
