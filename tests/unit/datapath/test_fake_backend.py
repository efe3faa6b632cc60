"""FakeBackend behaves like the kernel's WireGuard, so the agent's unit tests can trust it."""

from __future__ import annotations

import ipaddress

import pytest

from podwire.agent import datapath, keys, reconcile, uapi_client


def _key(n: int) -> str:
    return keys.encode_key(bytes([n]) * 32)


def _net(text: str) -> reconcile.IPNetwork:
    return ipaddress.ip_network(text)


def _desired(node: str, n: int, *cidrs: str, port: int = 51871) -> reconcile.DesiredPeer:
    return reconcile.DesiredPeer(
        node, _key(n), reconcile.Endpoint(f"192.0.2.{n}", port), tuple(map(_net, cidrs))
    )


def _sync(fake: datapath.FakeBackend, *peers: reconcile.DesiredPeer) -> reconcile.Plan:
    plan = reconcile.plan_peers(peers, fake.read_peers(), synced=True)
    fake.apply(plan)
    return plan


def test_add_update_remove_reach_the_desired_state() -> None:
    fake = datapath.FakeBackend()
    a, b = _desired("a", 1, "10.244.1.0/24"), _desired("b", 2, "10.244.2.0/24")
    _sync(fake, a, b)
    assert {p.public_key for p in fake.read_peers()} == {_key(1), _key(2)}
    a2 = _desired("a", 1, "10.244.1.0/24", "fd00:1::/64", port=5000)
    plan = _sync(fake, a2)
    assert plan.remove == (_key(2),) and len(plan.update) == 1
    (peer,) = fake.read_peers()
    assert peer.endpoint == reconcile.Endpoint("192.0.2.1", 5000)
    assert set(peer.allowed_ips) == set(a2.allowed_ips)
    assert _sync(fake, a2).empty  # idempotent: nothing left to do


def test_an_allowed_ip_given_to_one_peer_is_taken_from_another() -> None:
    fake = datapath.FakeBackend()
    _sync(fake, _desired("a", 1, "10.244.1.0/24", "10.244.9.0/24"))
    fake.apply_change(uapi_client.PeerChange(_key(2), allowed_ips=(_net("10.244.9.0/24"),)))
    peers = {p.public_key: p for p in fake.read_peers()}
    assert peers[_key(1)].allowed_ips == (_net("10.244.1.0/24"),)
    assert peers[_key(2)].allowed_ips == (_net("10.244.9.0/24"),)


def test_removing_a_peer_removes_its_allowed_ips() -> None:
    fake = datapath.FakeBackend()
    _sync(fake, _desired("a", 1, "10.244.1.0/24"))
    _sync(fake)
    assert fake.read_peers() == []
    # A new peer with the same CIDR gets it whole; nobody else holds it.
    _sync(fake, _desired("b", 2, "10.244.1.0/24"))
    (peer,) = fake.read_peers()
    assert peer.public_key == _key(2) and peer.allowed_ips == (_net("10.244.1.0/24"),)


def test_update_only_never_creates_and_allowed_ips_add_without_replace() -> None:
    fake = datapath.FakeBackend()
    fake.apply_change(uapi_client.PeerChange(_key(1), update_only=True))
    assert fake.read_peers() == []
    fake.apply_change(uapi_client.PeerChange(_key(1), allowed_ips=(_net("10.0.0.0/24"),)))
    fake.apply_change(uapi_client.PeerChange(_key(1), allowed_ips=(_net("10.0.1.0/24"),)))
    (peer,) = fake.read_peers()
    assert peer.allowed_ips == (_net("10.0.0.0/24"), _net("10.0.1.0/24"))


def test_keys_ports_and_a_failure_on_demand() -> None:
    fake = datapath.FakeBackend()
    fake.ensure_device()
    assert fake.public_key() is None
    raw = bytes(range(32))
    fake.set_private_key(raw)
    fake.set_listen_port(51871)
    assert fake.public_key() == keys.encode_key(keys.public_key_of(raw))
    fake.fail_next = RuntimeError("boom")
    plan = reconcile.plan_peers([_desired("a", 1, "10.244.1.0/24")], [], synced=True)
    with pytest.raises(RuntimeError, match="boom"):
        fake.apply(plan)
    assert fake.read_peers() == []
    fake.apply(plan)
    assert len(fake.read_peers()) == 1 and fake.applied == [plan]


def test_peer_changes_order_removals_first_and_updates_only_what_changed() -> None:
    a = _desired("a", 1, "10.244.1.0/24")
    plan = reconcile.Plan(
        add=(_desired("c", 3, "10.244.3.0/24"),),
        update=(reconcile.PeerUpdate(a, endpoint_changed=True, allowed_ips_changed=False),),
        remove=(_key(2),),
    )
    removed, updated, added = datapath.peer_changes(plan)
    assert removed.remove and removed.public_key == _key(2)
    assert updated.update_only and updated.endpoint == a.endpoint
    assert updated.allowed_ips == () and not updated.replace_allowed_ips
    assert added.replace_allowed_ips and added.allowed_ips == (_net("10.244.3.0/24"),)
