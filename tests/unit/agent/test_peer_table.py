"""PeerTable, the agent's record of its device between read-backs, follows WireGuard's rules.

The controller diffs against this record instead of reading 5,000 peers back on every pass, so
the record must end where the device ends after any plan: these tests drive both from random
states and compare.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from podwire.agent import datapath, keys, reconcile

KEYS = [keys.encode_key(bytes([n]) * 32) for n in range(1, 9)]
NETS = [ipaddress.ip_network(f"10.244.{n}.0/24") for n in range(12)]
ENDPOINTS = [reconcile.Endpoint(f"192.0.2.{n}", 51871) for n in range(1, 5)]


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


def _as_set(peers: list[reconcile.ActualPeer]) -> set[tuple[str, object, frozenset[object]]]:
    return {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in peers}


def _wanted(peers: list[reconcile.DesiredPeer]) -> set[tuple[str, object, frozenset[object]]]:
    return {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in peers}


@settings(max_examples=300, deadline=None)
@given(before=desired_states(), after=desired_states())
def test_after_a_plan_the_record_and_the_device_both_hold_the_desired_peers(
    before: list[reconcile.DesiredPeer], after: list[reconcile.DesiredPeer]
) -> None:
    device = datapath.FakeBackend()  # applies plans change by change, as the UAPI does
    device.apply(reconcile.plan_peers(before, [], synced=True))
    table = reconcile.PeerTable(device.read_peers())
    plan = reconcile.plan_peers(after, table.peers(), synced=True)
    device.apply(plan)
    table.apply(plan)
    assert _as_set(table.peers()) == _as_set(device.read_peers()) == _wanted(after)
    assert reconcile.plan_peers(after, table.peers(), synced=True).empty


@settings(max_examples=200, deadline=None)
@given(before=desired_states(), after=desired_states())
def test_unsynced_plans_keep_every_peer_in_the_record_too(
    before: list[reconcile.DesiredPeer], after: list[reconcile.DesiredPeer]
) -> None:
    device = datapath.FakeBackend()
    device.apply(reconcile.plan_peers(before, [], synced=True))
    table = reconcile.PeerTable(device.read_peers())
    plan = reconcile.plan_peers(after, table.peers(), synced=False)
    device.apply(plan)
    table.apply(plan)
    assert _as_set(table.peers()) == _as_set(device.read_peers())
    assert {p.public_key for p in before} <= {p.public_key for p in table.peers()}


def test_an_allowed_ip_moves_to_the_peer_it_is_given_to() -> None:
    table = reconcile.PeerTable()
    table.set(KEYS[0], ENDPOINTS[0], NETS[:2], replace_allowed_ips=True)
    table.set(KEYS[1], ENDPOINTS[1], NETS[1:3], replace_allowed_ips=True)
    assert table.get(KEYS[0]).allowed_ips == (NETS[0],)  # type: ignore[union-attr]
    table.remove(KEYS[1])
    table.set(KEYS[0], None, [NETS[2]], replace_allowed_ips=False)
    peer = table.get(KEYS[0])
    assert peer is not None and peer.allowed_ips == (NETS[0], NETS[2])
    assert peer.endpoint == ENDPOINTS[0]  # no endpoint given: the old one stays
    table.set(KEYS[5], ENDPOINTS[2], [NETS[4]], replace_allowed_ips=True, update_only=True)
    assert KEYS[5] not in table and len(table) == 1
