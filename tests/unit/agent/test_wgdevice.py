"""The device model: what a plan means as peer changes, and what a change does to a device.

`wgdevice.PeerTable` is both the agent's record of its device between read-backs and the unit
tests' fake device, so it must follow WireGuard's rules (an allowed-ip belongs to one peer at
a time); the integration tier checks the same record against podwire-engine and wireguard-go.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podwire.agent import keys, reconcile, wgdevice

KEYS = [keys.encode_key(bytes([n]) * 32) for n in range(1, 9)]
NETS = [ipaddress.ip_network(f"10.244.{n}.0/24") for n in range(12)]
ENDPOINTS = [wgdevice.Endpoint(f"192.0.2.{n}", 51871) for n in range(1, 5)]


def _desired(i: int, *nets: int, endpoint: int = 0) -> reconcile.DesiredPeer:
    return reconcile.DesiredPeer(
        f"node{i}", KEYS[i], ENDPOINTS[endpoint], tuple(NETS[n] for n in nets)
    )


@st.composite
def desired_states(draw: st.DrawFn) -> list[reconcile.DesiredPeer]:
    """Peers with distinct keys and disjoint allowed-ips, as desired_peers guarantees."""
    chosen = draw(st.lists(st.sampled_from(range(len(KEYS))), unique=True, max_size=6))
    free = list(NETS)
    peers = []
    for i in chosen:
        n = draw(st.integers(0, min(3, len(free))))
        nets, free = free[:n], free[n:]
        peers.append(
            reconcile.DesiredPeer(
                f"node{i}", KEYS[i], draw(st.sampled_from(ENDPOINTS)), tuple(sorted(nets))
            )
        )
    return peers


def _as_set(peers: list[wgdevice.Peer]) -> set[tuple[str, object, frozenset[object]]]:
    return {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in peers}


def _wanted(peers: list[reconcile.DesiredPeer]) -> set[tuple[str, object, frozenset[object]]]:
    return {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in peers}


def _sync(table: wgdevice.PeerTable, want: list[reconcile.DesiredPeer], *, synced: bool) -> None:
    table.apply(reconcile.plan_changes(reconcile.plan_peers(want, table.peers(), synced=synced)))


@settings(max_examples=300, deadline=None)
@given(before=desired_states(), after=desired_states())
def test_a_plan_applied_change_by_change_reaches_the_desired_peers(
    before: list[reconcile.DesiredPeer], after: list[reconcile.DesiredPeer]
) -> None:
    device = wgdevice.PeerTable()
    _sync(device, before, synced=True)
    _sync(device, after, synced=True)
    assert _as_set(device.peers()) == _wanted(after)
    assert reconcile.plan_peers(after, device.peers(), synced=True).empty


@settings(max_examples=200, deadline=None)
@given(before=desired_states(), after=desired_states())
def test_an_unsynced_plan_keeps_every_peer(
    before: list[reconcile.DesiredPeer], after: list[reconcile.DesiredPeer]
) -> None:
    device = wgdevice.PeerTable()
    _sync(device, before, synced=True)
    _sync(device, after, synced=False)
    assert {p.public_key for p in before} <= {p.public_key for p in device.peers()}
    # Every wanted peer is as wanted; a kept one may have lost an allowed-ip to it.
    held = {p.public_key: p for p in device.peers()}
    for peer in after:
        assert held[peer.public_key].endpoint == peer.endpoint
        assert set(held[peer.public_key].allowed_ips) == set(peer.allowed_ips)


def test_a_read_back_table_is_the_device_it_was_read_from() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 0, 1), _desired(1, 2)], synced=True)
    assert _as_set(wgdevice.PeerTable(device.peers()).peers()) == _as_set(device.peers())


def test_an_allowed_ip_given_to_one_peer_is_taken_from_another() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1, 9)], synced=True)
    device.apply_change(wgdevice.PeerChange(KEYS[1], allowed_ips=(NETS[9],)))
    assert device.get(KEYS[0]).allowed_ips == (NETS[1],)  # type: ignore[union-attr]
    assert device.get(KEYS[1]).allowed_ips == (NETS[9],)  # type: ignore[union-attr]


def test_removing_a_peer_frees_its_allowed_ips() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1)], synced=True)
    _sync(device, [], synced=True)
    assert device.peers() == []
    _sync(device, [_desired(1, 1)], synced=True)
    (peer,) = device.peers()
    assert peer.public_key == KEYS[1] and peer.allowed_ips == (NETS[1],)


def test_update_only_never_creates_and_allowed_ips_add_without_replace() -> None:
    device = wgdevice.PeerTable()
    device.apply_change(wgdevice.PeerChange(KEYS[0], update_only=True))
    assert device.peers() == []
    device.apply_change(wgdevice.PeerChange(KEYS[0], ENDPOINTS[0], allowed_ips=(NETS[0],)))
    device.apply_change(wgdevice.PeerChange(KEYS[0], allowed_ips=(NETS[1],)))
    (peer,) = device.peers()
    assert peer.allowed_ips == (NETS[0], NETS[1])
    assert peer.endpoint == ENDPOINTS[0]  # no endpoint given: the old one stays


def test_a_greeting_turns_keepalive_on_then_off_for_known_peers_only() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 0)], synced=True)
    on, off = wgdevice.greeting([KEYS[0], KEYS[1]])
    device.apply(on)
    assert device.get(KEYS[0]).persistent_keepalive == 1  # type: ignore[union-attr]
    assert KEYS[1] not in device  # update_only: a greeting never adds a peer
    device.apply(off)
    assert device.get(KEYS[0]).persistent_keepalive == 0  # type: ignore[union-attr]


def test_plan_changes_remove_first_and_update_only_what_changed() -> None:
    a = _desired(0, 1)
    plan = reconcile.Plan(
        add=(_desired(2, 3),),
        update=(reconcile.PeerUpdate(a, endpoint_changed=True, allowed_ips_changed=False),),
        remove=(KEYS[1],),
    )
    removed, updated, added = reconcile.plan_changes(plan)
    assert removed.remove and removed.public_key == KEYS[1]
    assert updated.update_only and updated.endpoint == a.endpoint
    assert updated.allowed_ips == () and not updated.replace_allowed_ips
    assert added.replace_allowed_ips and added.allowed_ips == (NETS[3],)


def test_a_node_that_rotated_its_key_is_renamed_not_removed_and_added() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1, 2), _desired(1, 3)], synced=True)
    rotated = reconcile.DesiredPeer("node0", KEYS[5], ENDPOINTS[0], (NETS[2], NETS[1]))
    unsynced = reconcile.plan_peers([rotated, _desired(1, 3)], device.peers(), synced=False)
    assert (unsynced.add, unsynced.rename, unsynced.remove) == ((rotated,), (), ())
    plan = reconcile.plan_peers([rotated, _desired(1, 3)], device.peers(), synced=True)
    assert plan.rename == (reconcile.PeerRename(KEYS[0], rotated),)
    assert (plan.add, plan.remove, plan.update) == ((), (), ())
    (change,) = reconcile.plan_changes(plan)
    assert change.renamed_from == KEYS[0] and change.public_key == KEYS[5]
    assert change.replace_allowed_ips and set(change.allowed_ips) == {NETS[1], NETS[2]}
    device.apply_change(change)
    assert KEYS[0] not in device
    assert set(device.get(KEYS[5]).allowed_ips) == {NETS[1], NETS[2]}  # type: ignore[union-attr]
    assert reconcile.plan_peers([rotated, _desired(1, 3)], device.peers(), synced=True).empty


def test_a_new_key_with_other_pod_cidrs_is_an_add_and_a_remove() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1)], synced=True)
    plan = reconcile.plan_peers([_desired(5, 1, 2)], device.peers(), synced=True)
    assert plan.rename == () and plan.remove == (KEYS[0],)
    assert [p.public_key for p in plan.add] == [KEYS[5]]


def test_a_rename_keeps_the_peers_counters_and_refuses_a_taken_key() -> None:
    device = wgdevice.PeerTable(
        [wgdevice.Peer(KEYS[0], ENDPOINTS[0], (NETS[0],), last_handshake=5.0, rx_bytes=7)]
    )
    device.apply_change(wgdevice.PeerChange(KEYS[1], renamed_from=KEYS[0]))
    (peer,) = device.peers()
    assert (peer.public_key, peer.last_handshake, peer.rx_bytes) == (KEYS[1], 5.0, 7)
    device.apply_change(wgdevice.PeerChange(KEYS[2], allowed_ips=(NETS[1],)))
    with pytest.raises(ValueError, match="exists"):
        device.apply_change(wgdevice.PeerChange(KEYS[2], renamed_from=KEYS[1]))
    # An unknown old key: a plain change on the new key.
    device.apply_change(wgdevice.PeerChange(KEYS[3], allowed_ips=(NETS[3],), renamed_from=KEYS[7]))
    assert device.get(KEYS[3]).allowed_ips == (NETS[3],)  # type: ignore[union-attr]


def test_without_renames_makes_the_new_peer_before_removing_the_old() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1, 2)], synced=True)
    rename = wgdevice.PeerChange(
        KEYS[5], ENDPOINTS[0], (NETS[1], NETS[2]), replace_allowed_ips=True, renamed_from=KEYS[0]
    )
    made, removed = wgdevice.without_renames([rename])
    assert made.renamed_from is None and made.public_key == KEYS[5]
    assert removed == wgdevice.PeerChange(KEYS[0], remove=True)
    device.apply([made, removed])
    (peer,) = device.peers()
    assert peer.public_key == KEYS[5] and set(peer.allowed_ips) == {NETS[1], NETS[2]}


def test_a_refused_rename_leaves_the_old_peer() -> None:
    device = wgdevice.PeerTable()
    _sync(device, [_desired(0, 1), _desired(1, 2)], synced=True)
    with pytest.raises(ValueError, match="exists"):
        device.apply_change(wgdevice.PeerChange(KEYS[1], renamed_from=KEYS[0]))
    assert {p.public_key for p in device.peers()} == {KEYS[0], KEYS[1]}
