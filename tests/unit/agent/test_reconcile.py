"""Reconcile: desired peers from Nodes and WireguardNodes, and the plan against the device.

The cluster in most tests: node-a (this node), node-b and node-c, each with an InternalIP
10.0.0.N, a pod CIDR 10.244.N.0/24 and a key derived from its letter, so tables stay readable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest

from podwire.agent import keys, reconcile, wgdevice
from podwire.agent.reconcile import DesiredPeer
from podwire.agent.wgdevice import Endpoint, Peer

NodeFactory = Callable[..., dict[str, Any]]
WgNodeFactory = Callable[..., dict[str, Any]]
OWN = "node-a"


def key_of(name: str) -> str:
    """A stable public key per node name."""
    seed = name.encode().ljust(32, b"\0")[:32]
    return keys.PrivateKey(seed).public_key_b64()


def net(text: str) -> wgdevice.IPNetwork:
    return ipaddress.ip_network(text)


@dataclasses.dataclass
class Cluster:
    """Nodes and WireguardNodes by name, as the two watch caches hold them."""

    make_node: NodeFactory
    make_wgnode: WgNodeFactory
    nodes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    wgnodes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def add(
        self,
        n: int,
        *,
        ips: tuple[str, ...] | None = None,
        cidrs: tuple[str, ...] | None = None,
        key: str | None = None,
        port: Any = 51871,
        publish: bool = True,
    ) -> str:
        name = f"node-{chr(ord('a') + n - 1)}" if n <= 26 else f"node-{n}"
        self.nodes[name] = self.make_node(
            name,
            internal_ips=ips if ips is not None else (f"10.0.0.{n}",),
            pod_cidrs=cidrs if cidrs is not None else (f"10.244.{n}.0/24",),
        )
        if publish:
            self.wgnodes[name] = self.make_wgnode(name, key or key_of(name), listen_port=port)
        return name

    def desired(self, **kwargs: Any) -> reconcile.Desired:
        return reconcile.desired_peers(self.nodes.values(), self.wgnodes.values(), OWN, **kwargs)


@pytest.fixture
def cluster(make_node: NodeFactory, make_wgnode: WgNodeFactory) -> Cluster:
    c = Cluster(make_node, make_wgnode)
    for n in (1, 2, 3):
        c.add(n)
    return c


def programmed(desired: reconcile.Desired) -> list[str]:
    return [p.node for p in desired.peers]


def refused(desired: reconcile.Desired) -> set[tuple[str, str]]:
    return {(r.node, r.reason) for r in desired.refusals}


# ---- desired peers -------------------------------------------------------------------------


def test_three_nodes_program_the_two_others(cluster: Cluster) -> None:
    desired = cluster.desired()
    assert desired.refusals == ()
    assert desired.peers == (
        DesiredPeer(
            "node-b", key_of("node-b"), Endpoint("10.0.0.2", 51871), (net("10.244.2.0/24"),)
        ),
        DesiredPeer(
            "node-c", key_of("node-c"), Endpoint("10.0.0.3", 51871), (net("10.244.3.0/24"),)
        ),
    )


Mutation = Callable[[Cluster], object]

# (case, change to the three-node cluster, programmed peers, refusals)
DESIRED_CASES: list[tuple[str, Mutation, list[str], set[tuple[str, str]]]] = [
    ("new node", lambda c: c.add(4), ["node-b", "node-c", "node-d"], set()),
    (
        "node not yet published",
        lambda c: c.add(4, publish=False),
        ["node-b", "node-c"],
        set(),
    ),
    (
        "node deleted, its WireguardNode not yet collected",
        lambda c: c.nodes.pop("node-c"),
        ["node-b"],
        set(),
    ),
    (
        "duplicate key: both refused, the third still programmed",
        lambda c: c.add(4, key=key_of("node-c")),
        ["node-b"],
        {("node-c", "DuplicatePublicKey"), ("node-d", "DuplicatePublicKey")},
    ),
    (
        "a peer with our own key",
        lambda c: c.wgnodes["node-b"]["spec"].update(publicKey=key_of(OWN)),
        ["node-c"],
        {("node-b", "DuplicatePublicKey")},
    ),
    (
        "overlapping pod CIDR: both refused",
        lambda c: c.add(4, cidrs=("10.244.2.128/25",)),
        ["node-c"],
        {("node-b", "OverlappingPodCIDR"), ("node-d", "OverlappingPodCIDR")},
    ),
    (
        "identical pod CIDR",
        lambda c: c.add(4, cidrs=("10.244.3.0/24",)),
        ["node-b"],
        {("node-c", "OverlappingPodCIDR"), ("node-d", "OverlappingPodCIDR")},
    ),
    (
        "pod CIDR overlapping our own",
        lambda c: c.add(4, cidrs=("10.244.0.0/22",)),
        [],
        {
            ("node-b", "OverlappingPodCIDR"),
            ("node-c", "OverlappingPodCIDR"),
            ("node-d", "OverlappingPodCIDR"),
        },
    ),
    (
        "pod CIDR overlapping a node that has not published",
        lambda c: c.add(4, cidrs=("10.244.2.0/24",), publish=False),
        ["node-c"],
        {("node-b", "OverlappingPodCIDR")},
    ),
    (
        "missing InternalIP",
        lambda c: c.add(4, ips=()),
        ["node-b", "node-c"],
        {("node-d", "MissingInternalIP")},
    ),
    (
        "unparsable InternalIP",
        lambda c: c.add(4, ips=("ten.zero.zero.four",)),
        ["node-b", "node-c"],
        {("node-d", "MissingInternalIP")},
    ),
    (
        "missing podCIDRs",
        lambda c: c.add(4, cidrs=()),
        ["node-b", "node-c"],
        {("node-d", "MissingPodCIDRs")},
    ),
    (
        "podCIDRs with host bits",
        lambda c: c.add(4, cidrs=("10.244.4.1/24",)),
        ["node-b", "node-c"],
        {("node-d", "InvalidPodCIDR")},
    ),
    (
        "invalid public key",
        lambda c: c.add(4, key="too-short="),
        ["node-b", "node-c"],
        {("node-d", "InvalidPublicKey")},
    ),
    (
        "invalid listen port",
        lambda c: c.add(4, port=70000),
        ["node-b", "node-c"],
        {("node-d", "InvalidWireguardNode")},
    ),
    (
        "several problems at once are all reported",
        lambda c: c.add(4, ips=(), cidrs=(), key="x"),
        ["node-b", "node-c"],
        {
            ("node-d", "InvalidPublicKey"),
            ("node-d", "MissingInternalIP"),
            ("node-d", "MissingPodCIDRs"),
        },
    ),
    (
        "our own Node missing (watch not listed yet)",
        lambda c: c.nodes.pop(OWN),
        ["node-b", "node-c"],
        set(),
    ),
]


@pytest.mark.parametrize(
    ("change", "peers", "refusals"),
    [case[1:] for case in DESIRED_CASES],
    ids=[case[0] for case in DESIRED_CASES],
)
def test_desired_peers_table(
    cluster: Cluster, change: Mutation, peers: list[str], refusals: set[tuple[str, str]]
) -> None:
    change(cluster)
    desired = cluster.desired()
    assert programmed(desired) == peers
    assert refused(desired) == refusals
    for refusal in desired.refusals:
        assert refusal.message  # something a person can act on


def test_refusal_messages_name_the_other_party(cluster: Cluster) -> None:
    cluster.add(4, key=key_of("node-c"), cidrs=("10.244.2.0/24",))
    by = {(r.node, r.reason): r.message for r in cluster.desired().refusals}
    assert "node-d" in by[("node-c", "DuplicatePublicKey")]
    assert "node-c" in by[("node-d", "DuplicatePublicKey")]
    assert "10.244.2.0/24 of node node-b" in by[("node-d", "OverlappingPodCIDR")]
    assert "10.244.2.0/24 of node node-d" in by[("node-b", "OverlappingPodCIDR")]


def test_nested_overlaps_are_all_named(cluster: Cluster) -> None:
    cluster.add(4, cidrs=("10.244.0.0/16",))
    cluster.add(5, cidrs=("10.244.0.0/20",))
    messages = {r.node: r.message for r in cluster.desired().refusals}
    for other in ("node-a", "node-b", "node-c", "node-e"):
        assert f"of node {other}" in messages["node-d"]
    assert "10.244.0.0/16 of node node-d" in messages["node-b"]
    assert "10.244.0.0/20 of node node-e" in messages["node-b"]


def test_allowed_ips_come_from_the_node_not_the_wireguard_node(cluster: Cluster) -> None:
    # node-b claims the whole pod range in its own status: it must not get it.
    cluster.wgnodes["node-b"]["status"] = {"podCIDRs": ["10.244.0.0/16"], "endpoint": "1.1.1.1:1"}
    peer = cluster.desired().peers[0]
    assert peer.allowed_ips == (net("10.244.2.0/24"),)
    assert peer.endpoint == Endpoint("10.0.0.2", 51871)


def test_a_garbled_status_does_not_cost_the_peer(cluster: Cluster) -> None:
    cluster.wgnodes["node-b"]["status"] = {"conditions": "all good", "peers": "many"}
    assert programmed(cluster.desired()) == ["node-b", "node-c"]


def test_listen_port_comes_from_the_wireguard_node(cluster: Cluster) -> None:
    cluster.wgnodes["node-c"]["spec"]["listenPort"] = 40000
    assert cluster.desired().peers[1].endpoint == Endpoint("10.0.0.3", 40000)


def test_own_public_key_overrides_the_published_one(cluster: Cluster) -> None:
    # Mid-rotation: the device already has the new key, the resource still the old one.
    new_key = key_of("fresh")
    cluster.wgnodes["node-b"]["spec"]["publicKey"] = new_key
    assert refused(cluster.desired(own_public_key=new_key)) == {("node-b", "DuplicatePublicKey")}
    assert programmed(cluster.desired()) == ["node-b", "node-c"]


def test_malformed_objects_never_crash(cluster: Cluster) -> None:
    garbage_nodes: list[Any] = [
        {},
        {"metadata": None},
        {"metadata": {"name": "node-x"}, "status": None, "spec": None},
        {
            "metadata": {"name": "node-y"},
            "status": {"addresses": "10.0.0.9"},
            "spec": {"podCIDRs": 5},
        },
        {"metadata": {"name": "node-z"}, "status": {"addresses": [None, {"type": "InternalIP"}]}},
    ]
    garbage_wgnodes: list[Any] = [
        {},
        {"metadata": {"name": 3}},
        {"metadata": {"name": "node-x"}, "spec": None},
        {"metadata": {"name": "node-y"}, "spec": {"publicKey": key_of("node-y"), "listenPort": 1}},
        {"metadata": {"name": "node-z"}, "spec": {"publicKey": key_of("node-z"), "listenPort": 1}},
    ]
    desired = reconcile.desired_peers(
        [*cluster.nodes.values(), *garbage_nodes],
        [*cluster.wgnodes.values(), *garbage_wgnodes],
        OWN,
    )
    assert programmed(desired) == ["node-b", "node-c"]
    assert refused(desired) == {
        ("node-x", "InvalidWireguardNode"),
        ("node-x", "MissingInternalIP"),
        ("node-x", "MissingPodCIDRs"),
        ("node-y", "MissingInternalIP"),
        ("node-y", "MissingPodCIDRs"),
        ("node-z", "MissingInternalIP"),
        ("node-z", "MissingPodCIDRs"),
    }


def test_legacy_single_pod_cidr_field(cluster: Cluster) -> None:
    del cluster.nodes["node-b"]["spec"]["podCIDRs"]
    assert cluster.desired().peers[0].allowed_ips == (net("10.244.2.0/24"),)


def test_result_does_not_depend_on_input_order(cluster: Cluster) -> None:
    for n in range(4, 12):
        cluster.add(n)
    cluster.add(12, key=key_of("node-d"))
    cluster.add(13, cidrs=("10.244.5.0/25",))
    expected = cluster.desired()
    rng = random.Random(7)
    for _ in range(10):
        nodes, wgs = list(cluster.nodes.values()), list(cluster.wgnodes.values())
        rng.shuffle(nodes)
        rng.shuffle(wgs)
        assert reconcile.desired_peers(nodes, wgs, OWN) == expected


# ---- dual stack ----------------------------------------------------------------------------


@pytest.fixture
def dual(make_node: NodeFactory, make_wgnode: WgNodeFactory) -> Cluster:
    c = Cluster(make_node, make_wgnode)
    c.add(1, ips=("10.0.0.1", "fd00::1"), cidrs=("10.244.1.0/24", "fd00:10:244:1::/64"))
    # node-b lists its IPv6 address first; node-c has only IPv6.
    c.add(2, ips=("fd00::2", "10.0.0.2"), cidrs=("fd00:10:244:2::/64", "10.244.2.0/24"))
    c.add(3, ips=("fd00::3",), cidrs=("fd00:10:244:3::/64",))
    return c


def test_dual_stack_prefers_our_own_family(dual: Cluster) -> None:
    b, c = dual.desired().peers
    assert b.endpoint == Endpoint("10.0.0.2", 51871)
    assert b.allowed_ips == (net("10.244.2.0/24"), net("fd00:10:244:2::/64"))
    assert c.endpoint == Endpoint("fd00::3", 51871)  # no IPv4: its only address


def test_dual_stack_ipv6_primary(dual: Cluster) -> None:
    dual.nodes[OWN]["status"]["addresses"].reverse()  # fd00::1 now comes first
    b, _ = dual.desired().peers
    assert b.endpoint == Endpoint("fd00::2", 51871)
    assert str(b.endpoint) == "[fd00::2]:51871"


def test_dual_stack_overlap_is_per_family(dual: Cluster) -> None:
    dual.add(4, ips=("10.0.0.4",), cidrs=("10.244.4.0/24", "fd00:10:244:3::/64"))
    assert refused(dual.desired()) == {
        ("node-c", "OverlappingPodCIDR"),
        ("node-d", "OverlappingPodCIDR"),
    }


# ---- overlap detection against the obvious pairwise check ----------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_overlap_detection_matches_a_naive_pairwise_check(
    seed: int, make_node: NodeFactory, make_wgnode: WgNodeFactory
) -> None:
    rng = random.Random(seed)
    c = Cluster(make_node, make_wgnode)
    cidrs: dict[str, list[wgdevice.IPNetwork]] = {}
    for n in range(1, 41):
        nets: list[wgdevice.IPNetwork] = []
        for _ in range(rng.choice((1, 1, 2))):
            if rng.random() < 0.7:
                prefix = rng.randint(21, 28)
                base = int(ipaddress.IPv4Address("10.244.0.0")) + rng.randrange(1 << 16)
                nets.append(ipaddress.IPv4Network((base >> (32 - prefix) << (32 - prefix), prefix)))
            else:
                prefix = rng.randint(56, 64)
                base = (0xFD00 << 112) + (rng.randrange(1 << 12) << 64)
                nets.append(
                    ipaddress.IPv6Network((base >> (128 - prefix) << (128 - prefix), prefix))
                )
        name = c.add(n, cidrs=tuple(str(x) for x in nets), publish=rng.random() < 0.9)
        cidrs[name] = nets
    naive = {
        name
        for name, mine in cidrs.items()
        for other, theirs in cidrs.items()
        if other != name and any(a.overlaps(b) for a in mine for b in theirs)
    }
    published = set(c.wgnodes) - {OWN}
    got = {n for n, reason in refused(c.desired()) if reason == "OverlappingPodCIDR"}
    assert got == naive & published
    assert 0 < len(naive) < len(cidrs)  # the input does exercise both outcomes


# ---- the plan ------------------------------------------------------------------------------


def actual_from(peers: tuple[DesiredPeer, ...]) -> list[Peer]:
    """What the device holds once these peers have been programmed (allowed-ips reordered)."""
    return [Peer(p.public_key, p.endpoint, tuple(reversed(p.allowed_ips))) for p in peers]


def test_empty_device_gets_every_peer(cluster: Cluster) -> None:
    plan = reconcile.plan_peers(cluster.desired().peers, [], synced=False)
    assert [p.node for p in plan.add] == ["node-b", "node-c"]
    assert plan.update == () and plan.remove == ()


def test_no_change_is_an_empty_plan(cluster: Cluster) -> None:
    peers = cluster.desired().peers
    plan = reconcile.plan_peers(peers, actual_from(peers), synced=True)
    assert plan.empty and plan == reconcile.Plan()


def test_endpoint_change_updates_only_that_peer(cluster: Cluster) -> None:
    before = cluster.desired().peers
    cluster.nodes["node-c"]["status"]["addresses"] = [{"type": "InternalIP", "address": "10.0.1.3"}]
    plan = reconcile.plan_peers(cluster.desired().peers, actual_from(before), synced=True)
    assert plan.add == () and plan.remove == ()
    (update,) = plan.update
    assert update.peer.node == "node-c"
    assert update.peer.endpoint == Endpoint("10.0.1.3", 51871)
    assert (update.endpoint_changed, update.allowed_ips_changed) == (True, False)
    assert update.peer.allowed_ips == (net("10.244.3.0/24"),)  # the full set, unchanged


def test_pod_cidr_change_updates_with_the_full_new_set(cluster: Cluster) -> None:
    before = cluster.desired().peers
    cluster.nodes["node-b"]["spec"]["podCIDRs"] = ["10.244.2.0/24", "fd00:10:244:2::/64"]
    (update,) = reconcile.plan_peers(
        cluster.desired().peers, actual_from(before), synced=True
    ).update
    assert (update.endpoint_changed, update.allowed_ips_changed) == (False, True)
    assert update.peer.allowed_ips == (net("10.244.2.0/24"), net("fd00:10:244:2::/64"))


def test_a_peer_without_endpoint_on_the_device_is_updated(cluster: Cluster) -> None:
    peers = cluster.desired().peers
    actual = actual_from(peers)
    actual[0] = dataclasses.replace(actual[0], endpoint=None)
    (update,) = reconcile.plan_peers(peers, actual, synced=True).update
    assert update.peer.node == "node-b" and update.endpoint_changed


@pytest.mark.parametrize(("synced", "removed"), [(True, True), (False, False)])
def test_node_removed(cluster: Cluster, synced: bool, removed: bool) -> None:
    before = cluster.desired().peers
    del cluster.nodes["node-c"], cluster.wgnodes["node-c"]
    plan = reconcile.plan_peers(cluster.desired().peers, actual_from(before), synced=synced)
    assert plan.add == () and plan.update == ()
    assert plan.remove == ((key_of("node-c"),) if removed else ())


def test_unsynced_caches_never_remove_even_when_empty(cluster: Cluster) -> None:
    # The apiserver is unreachable and the caches are empty: the device keeps its state.
    actual = actual_from(cluster.desired().peers)
    assert reconcile.plan_peers([], actual, synced=False).empty


def test_key_rotation_renames_the_peer_once_synced(cluster: Cluster) -> None:
    before = cluster.desired().peers
    cluster.wgnodes["node-b"]["spec"]["publicKey"] = key_of("node-b2")
    desired = cluster.desired().peers
    plan = reconcile.plan_peers(desired, actual_from(before), synced=True)
    ((renamed),) = plan.rename
    assert (renamed.old_key, renamed.peer.public_key) == (key_of("node-b"), key_of("node-b2"))
    assert plan.add == () and plan.remove == ()
    unsynced = reconcile.plan_peers(desired, actual_from(before), synced=False)
    assert [p.public_key for p in unsynced.add] == [key_of("node-b2")]
    assert unsynced.remove == () and unsynced.rename == ()


def test_a_refused_node_is_removed_once_synced(cluster: Cluster) -> None:
    before = cluster.desired().peers
    cluster.add(4, key=key_of("node-c"))  # node-c's key now contested
    plan = reconcile.plan_peers(cluster.desired().peers, actual_from(before), synced=True)
    assert plan.remove == (key_of("node-c"),) and plan.add == ()


def test_plans_are_sorted_and_keys_unique(cluster: Cluster) -> None:
    for n in (9, 5, 7):
        cluster.add(n)
    plan = reconcile.plan_peers(cluster.desired().peers, [], synced=True)
    assert [p.node for p in plan.add] == sorted(p.node for p in plan.add)
    peer = plan.add[0]
    with pytest.raises(ValueError, match="twice"):
        reconcile.plan_peers([peer, peer], [], synced=True)
    stale = [Peer(key_of(f"old-{i}"), None) for i in range(5)]
    removed = reconcile.plan_peers([], stale, synced=True).remove
    assert list(removed) == sorted(removed)


def test_applying_a_plan_then_planning_again_is_empty(cluster: Cluster) -> None:
    device: dict[str, Peer] = {
        key_of("gone"): Peer(key_of("gone"), Endpoint("10.9.9.9", 1), (net("10.9.0.0/24"),)),
        key_of("node-b"): Peer(key_of("node-b"), Endpoint("10.0.0.99", 51871), ()),
    }
    cluster.add(4)
    desired = cluster.desired().peers
    plan = reconcile.plan_peers(desired, device.values(), synced=True)
    for peer in plan.add:
        device[peer.public_key] = Peer(peer.public_key, peer.endpoint, peer.allowed_ips)
    for update in plan.update:
        p = update.peer
        device[p.public_key] = Peer(p.public_key, p.endpoint, p.allowed_ips)
    for key in plan.remove:
        del device[key]
    assert reconcile.plan_peers(desired, device.values(), synced=True).empty


# ---- routes --------------------------------------------------------------------------------


def test_routes_follow_the_programmed_peers(cluster: Cluster) -> None:
    peers = cluster.desired().peers
    assert reconcile.desired_routes(peers) == (net("10.244.2.0/24"), net("10.244.3.0/24"))
    plan = reconcile.plan_routes(peers, [], synced=False)
    assert plan.add == (net("10.244.2.0/24"), net("10.244.3.0/24")) and plan.remove == ()
    assert reconcile.plan_routes(peers, plan.add, synced=True).empty


@pytest.mark.parametrize("synced", [True, False])
def test_routes_of_a_removed_node(cluster: Cluster, synced: bool) -> None:
    actual = reconcile.desired_routes(cluster.desired().peers)
    del cluster.nodes["node-b"]
    plan = reconcile.plan_routes(cluster.desired().peers, actual, synced=synced)
    assert plan.add == ()
    assert plan.remove == ((net("10.244.2.0/24"),) if synced else ())


def test_routes_of_a_refused_node_are_not_added(cluster: Cluster) -> None:
    cluster.add(4, ips=())
    assert (
        net("10.244.4.0/24")
        not in reconcile.plan_routes(cluster.desired().peers, [], synced=True).add
    )


# ---- endpoints and MTU ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("10.0.0.2:51871", Endpoint("10.0.0.2", 51871)),
        ("[fd00::2]:51871", Endpoint("fd00::2", 51871)),
        ("[fd00:0:0::2]:1", Endpoint("fd00::2", 1)),
        ("[::ffff:10.0.0.2]:51871", Endpoint("10.0.0.2", 51871)),
        ("[fe80::1%eth0]:51871", Endpoint("fe80::1", 51871)),
    ],
)
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    assert wgdevice.parse_endpoint(text) == endpoint


@pytest.mark.parametrize("text", ["10.0.0.2", "fd00::2:51871", "host:51871", "10.0.0.2:0", ":1"])
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        wgdevice.parse_endpoint(text)


@pytest.mark.parametrize(
    ("underlay", "ipv6", "override", "mtu"),
    [
        (1500, False, 0, 1440),
        (1500, True, 0, 1420),
        (9001, False, 0, 8941),
        (1450, True, 0, 1370),  # an overlay underneath
        (1500, False, 1300, 1300),
    ],
)
def test_mtu_for(underlay: int, ipv6: bool, override: int, mtu: int) -> None:
    assert wgdevice.mtu_for(underlay, ipv6, override=override) == mtu


def test_mtu_for_refuses_a_tiny_underlay() -> None:
    with pytest.raises(ValueError, match="set the MTU"):
        wgdevice.mtu_for(600, True)


# ---- scale ---------------------------------------------------------------------------------


def test_five_thousand_nodes_plan_in_full_and_one_rotation_is_one_rename(
    make_node: NodeFactory, make_wgnode: WgNodeFactory
) -> None:
    # The control-plane benchmark's size. How fast is bench/control_plane.py's business (it
    # runs against wireguard-go in the same run); here: the plans are whole and minimal.
    nodes, wgs = [], []
    for i in range(5000):
        name = f"n{i}"
        nodes.append(
            make_node(
                name,
                internal_ips=(f"10.{i >> 8}.{i & 255}.1", f"fd00::{i:x}:1"),
                pod_cidrs=(f"10.{64 + (i >> 8)}.{i & 255}.0/24", f"fd00:10:{i:x}::/64"),
            )
        )
        wgs.append(make_wgnode(name, keys.encode_key(i.to_bytes(32, "big"))))
    desired = reconcile.desired_peers(nodes, wgs, "n0")
    plan = reconcile.plan_peers(desired.peers, [], synced=True)
    routes = reconcile.plan_routes(desired.peers, [], synced=True)
    assert desired.refusals == () and len(plan.add) == 4999 and len(routes.add) == 9998
    table = wgdevice.PeerTable()
    table.apply(reconcile.plan_changes(plan))
    wgs[77] = make_wgnode("n77", keys.encode_key((10**6).to_bytes(32, "big")))
    again = reconcile.plan_peers(
        reconcile.desired_peers(nodes, wgs, "n0").peers, table.peers(), synced=True
    )
    assert [r.peer.node for r in again.rename] == ["n77"]
    assert (again.add, again.update, again.remove) == ((), (), ())


# ---- pod CIDRs must lie inside the cluster's --------------------------------------------

CLUSTER_V4 = (net("10.244.0.0/16"),)
DUAL_CLUSTER = (net("10.244.0.0/16"), net("fd00:10:244::/56"))

# (case, change to the three-node cluster, cluster pod CIDRs, programmed peers, refusals)
RANGE_CASES: list[
    tuple[str, Mutation, tuple[wgdevice.IPNetwork, ...], list[str], set[tuple[str, str]]]
] = [
    ("inside the range", lambda c: c.add(4), CLUSTER_V4, ["node-b", "node-c", "node-d"], set()),
    (
        "outside the range",
        lambda c: c.add(4, cidrs=("10.96.0.0/24",)),
        CLUSTER_V4,
        ["node-b", "node-c"],
        {("node-d", "PodCIDROutsideCluster")},
    ),
    (
        "wider than the range",
        lambda c: c.add(4, cidrs=("10.0.0.0/8",)),
        CLUSTER_V4,
        [],
        {
            ("node-b", "OverlappingPodCIDR"),
            ("node-c", "OverlappingPodCIDR"),
            ("node-d", "OverlappingPodCIDR"),
            ("node-d", "PodCIDROutsideCluster"),
            ("node-d", "PodCIDRCoversNodeAddress"),
        },
    ),
    (
        "one CIDR inside, one outside: the node is refused whole",
        lambda c: c.add(4, cidrs=("10.244.4.0/24", "192.168.0.0/24")),
        CLUSTER_V4,
        ["node-b", "node-c"],
        {("node-d", "PodCIDROutsideCluster")},
    ),
    (
        "a family the setting does not cover",
        lambda c: c.add(4, cidrs=("10.244.4.0/24", "fd00:10:244:4::/64")),
        CLUSTER_V4,
        ["node-b", "node-c"],
        {("node-d", "PodCIDROutsideCluster")},
    ),
    (
        "both families covered",
        lambda c: c.add(4, cidrs=("10.244.4.0/24", "fd00:10:244:4::/64")),
        DUAL_CLUSTER,
        ["node-b", "node-c", "node-d"],
        set(),
    ),
    (
        "covers its own InternalIP",
        lambda c: c.add(4, ips=("10.244.4.7",)),
        CLUSTER_V4,
        ["node-b", "node-c"],
        {("node-d", "PodCIDRCoversNodeAddress")},
    ),
    (
        "covers another node's InternalIP",
        lambda c: c.nodes["node-c"]["status"]["addresses"].append(
            {"type": "InternalIP", "address": "10.244.2.9"}
        ),
        CLUSTER_V4,
        ["node-c"],
        {("node-b", "PodCIDRCoversNodeAddress")},
    ),
    (
        "covers our own InternalIP",
        lambda c: c.nodes[OWN]["status"]["addresses"].append(
            {"type": "InternalIP", "address": "10.244.3.1"}
        ),
        CLUSTER_V4,
        ["node-b"],
        {("node-c", "PodCIDRCoversNodeAddress")},
    ),
    (
        "no setting: no range to check against",
        lambda c: c.add(4, cidrs=("10.96.0.0/24",)),
        (),
        ["node-b", "node-c", "node-d"],
        set(),
    ),
]


@pytest.mark.parametrize(
    ("change", "cidrs", "peers", "refusals"),
    [case[1:] for case in RANGE_CASES],
    ids=[case[0] for case in RANGE_CASES],
)
def test_pod_cidrs_must_lie_inside_the_cluster_range(
    cluster: Cluster,
    change: Mutation,
    cidrs: tuple[wgdevice.IPNetwork, ...],
    peers: list[str],
    refusals: set[tuple[str, str]],
) -> None:
    change(cluster)
    desired = cluster.desired(cluster_pod_cidrs=cidrs)
    assert programmed(desired) == peers
    assert refused(desired) == refusals
    routes = reconcile.plan_routes(desired.peers, [], synced=True).add
    assert all(any(r.subnet_of(c) for c in cidrs if c.version == r.version) for r in routes) or (
        not cidrs
    )


def test_out_of_range_messages_say_what_and_why(cluster: Cluster) -> None:
    cluster.add(4, cidrs=("10.244.4.0/24", "fd00:10:244:4::/64", "192.168.0.0/24"))
    cluster.add(5, ips=("10.244.5.9",))
    by = {
        (r.node, r.reason): r.message
        for r in cluster.desired(cluster_pod_cidrs=CLUSTER_V4).refusals
    }
    outside = by[("node-d", "PodCIDROutsideCluster")]
    assert "192.168.0.0/24" in outside and "10.244.0.0/16" in outside
    assert "fd00:10:244:4::/64" in outside and "IPv6" in outside
    assert "10.244.4.0/24" not in outside
    covers = by[("node-e", "PodCIDRCoversNodeAddress")]
    assert "10.244.5.9" in covers and "node-e" in covers


def test_the_apiserver_address_is_read_from_its_url() -> None:
    assert reconcile.server_addresses("https://10.96.0.1:443") == (
        ipaddress.ip_address("10.96.0.1"),
    )
    assert reconcile.server_addresses("https://[fd00::1]:6443") == (
        ipaddress.ip_address("fd00::1"),
    )
    assert reconcile.server_addresses("https://kubernetes.default.svc") == ()
    assert reconcile.server_addresses("") == ()
