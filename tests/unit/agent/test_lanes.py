"""Lanes: which lane of this node pairs with which lane of a peer, the routes over them, and an
agent with two lanes on fakes (keys, ports, peers per lane, publication, rotation).

Lane i of a node peers with lane i of every node that has one; a node with fewer lanes is
reached over the lanes it has; routes are multipath over the lanes both nodes share.
"""

from __future__ import annotations

import pathlib
import stat
import threading
from collections.abc import Callable

import pytest
from agentfakes import (
    FakeApi,
    FakeApiError,
    FakeBackend,
    FakeRoutes,
    MemorySource,
    OtherNode,
    net,
    node,
)

from podwire.agent import api, app, config, keys, metrics, reconcile, watches, wgdevice
from podwire.agent import clock as clock_mod
from podwire.api import wgnode

CLUSTER = net("10.244.0.0/16")


def _key() -> str:
    return keys.PrivateKey.generate().public_key_b64()


def _lane_wgnode(name: str, keys_: list[str], port: int = 51871) -> dict[str, object]:
    spec = wgnode.Spec(
        keys_[0],
        port,
        lanes=tuple(wgnode.Lane(k, port + i) for i, k in enumerate(keys_[1:], start=1)),
    )
    return {"metadata": {"name": name}, "spec": spec.to_dict()}


def _desired(*others: tuple[str, int, list[str]], own_lane_keys: tuple[str, ...] = ()):
    nodes = [node("n1", "192.0.2.1", ["10.244.1.0/24"])]
    wgs: list[dict[str, object]] = [_lane_wgnode("n1", [_key()])]
    for name, index, lane_keys in others:
        nodes.append(node(name, f"192.0.2.{index}", [f"10.244.{index}.0/24"]))
        wgs.append(_lane_wgnode(name, lane_keys))
    return reconcile.desired_peers(
        nodes, wgs, "n1", own_lane_keys=own_lane_keys, cluster_pod_cidrs=(CLUSTER,)
    )


# --- planning (pure) ---------------------------------------------------------------------


def test_lane_i_pairs_with_lane_i_and_a_node_with_fewer_lanes_is_on_the_lanes_it_has() -> None:
    k2, k3 = [_key(), _key(), _key()], [_key()]
    desired = _desired(("n2", 2, k2), ("n3", 3, k3))
    assert not desired.refusals
    lane0 = reconcile.lane_peers(desired.peers, 0)
    lane1 = reconcile.lane_peers(desired.peers, 1)
    lane2 = reconcile.lane_peers(desired.peers, 2)
    assert [(p.node, p.public_key, p.endpoint.port) for p in lane0] == [
        ("n2", k2[0], 51871),
        ("n3", k3[0], 51871),
    ]
    assert [(p.node, p.public_key, str(p.endpoint)) for p in lane1] == [
        ("n2", k2[1], "192.0.2.2:51872")
    ]
    assert [(p.node, p.public_key, p.endpoint.port) for p in lane2] == [("n2", k2[2], 51873)]
    # Every lane's peer may send the remote node's pods: reverse-path holds on every lane.
    assert lane1[0].allowed_ips == lane0[0].allowed_ips == (net("10.244.2.0/24"),)


def test_routes_go_over_the_lanes_both_nodes_have() -> None:
    desired = _desired(("n2", 2, [_key(), _key(), _key()]), ("n3", 3, [_key()]))
    # This node has 2 lanes: n2 (3 lanes) shares 2, n3 (1 lane) shares lane 0 only.
    assert reconcile.desired_paths(desired.peers, 2) == {
        net("10.244.2.0/24"): (0, 1),
        net("10.244.3.0/24"): (0,),
    }
    # With one lane, every route is a plain one through lane 0, as it always was.
    assert set(reconcile.desired_paths(desired.peers, 1).values()) == {(0,)}
    assert reconcile.shared_lanes(desired.peers[0], 8) == (0, 1, 2)


@pytest.mark.parametrize(
    ("actual", "synced", "add", "remove"),
    [
        # 1: nothing yet: both routes added.
        ({}, False, [("10.244.2.0/24", (0, 1)), ("10.244.3.0/24", (0,))], []),
        # 2: all in place: nothing to do.
        ({"10.244.2.0/24": (0, 1), "10.244.3.0/24": (0,)}, True, [], []),
        # 3: a route over one lane that should be over two (a peer gained a lane): replaced.
        ({"10.244.2.0/24": (0,), "10.244.3.0/24": (0,)}, True, [("10.244.2.0/24", (0, 1))], []),
        # 4: a lane's device went (its nexthop shows as no lane, -1): replaced.
        (
            {"10.244.2.0/24": (-1, 0), "10.244.3.0/24": (0,)},
            True,
            [("10.244.2.0/24", (0, 1))],
            [],
        ),
        # 5: a route no peer wants: removed once synced, kept before.
        (
            {"10.244.2.0/24": (0, 1), "10.244.3.0/24": (0,), "10.244.9.0/24": (0, 1)},
            True,
            [],
            ["10.244.9.0/24"],
        ),
        (
            {"10.244.2.0/24": (0, 1), "10.244.3.0/24": (0,), "10.244.9.0/24": (0, 1)},
            False,
            [],
            [],
        ),
    ],
)
def test_plan_paths_table(
    actual: dict[str, tuple[int, ...]],
    synced: bool,
    add: list[tuple[str, tuple[int, ...]]],
    remove: list[str],
) -> None:
    want = {net("10.244.2.0/24"): (0, 1), net("10.244.3.0/24"): (0,)}
    plan = reconcile.plan_paths(want, {net(k): v for k, v in actual.items()}, synced=synced)
    assert plan.add == tuple((net(k), v) for k, v in add)
    assert plan.remove == tuple(net(k) for k in remove)


def test_a_lane_key_two_nodes_claim_or_that_is_ours_is_refused() -> None:
    shared = _key()
    desired = _desired(("n2", 2, [_key(), shared]), ("n3", 3, [_key(), shared]))
    assert {p.node for p in desired.peers} == set()
    assert {(r.node, r.reason) for r in desired.refusals} == {
        ("n2", reconcile.DUPLICATE_PUBLIC_KEY),
        ("n3", reconcile.DUPLICATE_PUBLIC_KEY),
    }
    mine = _key()
    desired = _desired(("n2", 2, [_key(), mine]), own_lane_keys=(mine,))
    assert [r.reason for r in desired.refusals] == [reconcile.DUPLICATE_PUBLIC_KEY]


@pytest.mark.parametrize(
    "lanes",
    [
        "not a list",
        [{"publicKey": "short=", "listenPort": 51872}],
        [{"publicKey": None, "listenPort": 51872}],
        [{"listenPort": 51872}],
        ["a string"],
    ],
)
def test_malformed_lanes_cost_that_node_and_never_the_pass(lanes: object) -> None:
    nodes = [node("n1", "192.0.2.1", ["10.244.1.0/24"]), node("n2", "192.0.2.2", ["10.244.2.0/24"])]
    bad = {
        "metadata": {"name": "n2"},
        "spec": {"publicKey": _key(), "listenPort": 1, "lanes": lanes},
    }
    desired = reconcile.desired_peers(nodes, [bad], "n1", cluster_pod_cidrs=(CLUSTER,))
    assert desired.peers == ()
    assert [r.node for r in desired.refusals] == ["n2"]


def test_a_spec_with_one_lane_is_written_as_before_and_lanes_round_trip() -> None:
    key = _key()
    assert wgnode.Spec(key, 51871).to_dict() == {"publicKey": key, "listenPort": 51871}
    two = wgnode.Spec(key, 51871, lanes=(wgnode.Lane(_key(), 51872),))
    assert wgnode.Spec.from_dict(two.to_dict()) == two
    # An agent that knows nothing of lanes reads lane 0 from the same fields.
    assert (two.to_dict()["publicKey"], two.to_dict()["listenPort"]) == (key, 51871)
    with pytest.raises(wgnode.ResourceError, match="key of its own"):
        wgnode.Spec(key, 51871, lanes=(wgnode.Lane(key, 51872),))


def test_config_names_each_lane_and_refuses_what_cannot_work(tmp_path: pathlib.Path) -> None:
    cfg = config.from_mapping(
        {"node_name": "n1", "key_path": tmp_path / "private.key", "lanes": "3"},
        base={"cluster_pod_cidrs": "10.244.0.0/16"},
    )
    assert [cfg.lane_device(i) for i in range(3)] == [
        "podwire_wg0",
        "podwire_wg0_1",
        "podwire_wg0_2",
    ]
    assert [cfg.lane_port(i) for i in range(3)] == [51871, 51872, 51873]
    assert [cfg.lane_key_path(i).name for i in range(3)] == [
        "private.key",
        "private-lane1.key",
        "private-lane2.key",
    ]
    assert config.Config(node_name="n1", cluster_pod_cidrs=(CLUSTER,)).lanes == 1
    base = {"node_name": "n1", "cluster_pod_cidrs": "10.244.0.0/16"}
    for bad, why in [
        ({"lanes": 0}, "1..8"),
        ({"lanes": 9}, "1..8"),
        ({"lanes": 2, "device": "fifteen_chars_x"[:14]}, "longer than 15"),
        ({"lanes": 2, "listen_port": 65535}, "65536"),
    ]:
        with pytest.raises(config.ConfigError, match=why):
            config.from_mapping({**base, **bad})


# --- an agent with two lanes, on fakes ---------------------------------------------------


class LaneRoutes(FakeRoutes):
    """FakeRoutes with routes over lanes: destination -> the lanes of its nexthops."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: dict[wgdevice.IPNetwork, tuple[int, ...]] = {}

    def list_paths(self) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
        return dict(self.paths)

    def apply_paths(self, plan: reconcile.PathPlan) -> None:
        self.paths.update(plan.add)
        for dst in plan.remove:
            self.paths.pop(dst, None)


class TwoLanes:
    """An agent with lanes: 2 assembled on fakes, one FakeBackend per lane."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.cfg = config.Config(
            node_name="n1",
            key_path=tmp_path / "private.key",
            cluster_pod_cidrs=(CLUSTER,),
            lanes=2,
        )
        self.api = FakeApi()
        self.api.nodes["n1"] = node("n1", "192.0.2.1", ["10.244.1.0/24"])
        wakeup = threading.Event()
        self.nodes = MemorySource("nodes", on_change=wakeup.set)
        self.wgnodes = MemorySource("wgnodes", on_change=wakeup.set)
        self.api.on_write = self.wgnodes.put
        self.routes = LaneRoutes()
        self.backends = [FakeBackend(), FakeBackend()]
        self.clock = clock_mod.FakeClock()

        def open_lane(lane: int) -> Callable[[str | None, str], FakeBackend]:
            return lambda _address, datapath: self.backends[lane]

        self.agent = app.assemble(
            self.cfg,
            api=self.api,
            api_error=FakeApiError,
            emit=self.api.emit_event,
            watched=watches.Watches(self.nodes, self.wgnodes),
            wakeup=wakeup,
            open_backend=lambda _address: self.backends[0],
            open_lane=open_lane,
            routes=self.routes,
            clock=self.clock,
        )

    def start(self, *others: OtherNode | tuple[str, int, list[str]]) -> None:
        assert self.agent.start(threading.Event(), loop=False)
        self.agent.controller.step(woke=True)  # publishes
        nodes = [self.api.nodes["n1"]]
        wgs = [dict(o) for o in self.api.wgnodes.values()]
        for name, index, lane_keys in others:  # type: ignore[misc]
            nodes.append(node(name, f"192.0.2.{index}", [f"10.244.{index}.0/24"]))
            wgs.append(_lane_wgnode(name, lane_keys))
        self.nodes.list(nodes)
        self.wgnodes.list(wgs)
        self.agent.controller.step(woke=True)


@pytest.fixture
def two(tmp_path: pathlib.Path) -> TwoLanes:
    return TwoLanes(tmp_path)


def test_each_lane_has_its_own_device_key_file_and_port(two: TwoLanes) -> None:
    two.start()
    lane0, lane1 = two.backends
    assert lane0.exists and lane1.exists
    assert (lane0.listen_port, lane1.listen_port) == (51871, 51872)
    assert lane0.private_key and lane1.private_key and lane0.private_key != lane1.private_key
    for lane in (0, 1):
        path = two.cfg.lane_key_path(lane)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert keys.load(path).raw == two.backends[lane].private_key


def test_lanes_are_published_and_pair_with_the_lanes_peers_have(two: TwoLanes) -> None:
    k2, k3 = [_key(), _key()], [_key()]
    two.start(("n2", 2, k2), ("n3", 3, k3))
    spec = two.api.wgnodes["n1"]["spec"]
    lane1_public = keys.load(two.cfg.lane_key_path(1)).public_key_b64()
    assert spec["lanes"] == [{"publicKey": lane1_public, "listenPort": 51872}]
    assert spec["publicKey"] == two.agent.keys.public_key
    lane0, lane1 = two.backends
    assert {p.public_key: str(p.endpoint) for p in lane0.table.peers()} == {
        k2[0]: "192.0.2.2:51871",
        k3[0]: "192.0.2.3:51871",
    }
    assert {p.public_key: str(p.endpoint) for p in lane1.table.peers()} == {
        k2[1]: "192.0.2.2:51872"
    }
    assert two.routes.paths == {net("10.244.2.0/24"): (0, 1), net("10.244.3.0/24"): (0,)}
    assert two.routes.routes == set()  # no single-lane route beside the multipath ones
    two.agent.publisher.write_status()
    assert two.api.wgnodes["n1"]["status"]["lanes"] == 2


def test_a_peer_that_drops_to_one_lane_leaves_lane_1_and_its_route_narrows(
    two: TwoLanes,
) -> None:
    k2 = [_key(), _key()]
    two.start(("n2", 2, k2))
    assert len(two.backends[1].table.peers()) == 1
    two.wgnodes.put(_lane_wgnode("n2", k2[:1]))
    two.agent.controller.step(woke=True)
    assert two.backends[1].table.peers() == [] or not list(two.backends[1].table.peers())
    assert two.routes.paths == {net("10.244.2.0/24"): (0,)}


def test_one_rotation_renews_every_lane_device_first_then_one_publish(two: TwoLanes) -> None:
    two.start(("n2", 2, [_key(), _key()]))
    before = [b.private_key for b in two.backends]
    writes: list[dict[str, object]] = []
    on_devices: list[tuple[bytes | None, ...]] = []  # each lane's key when a write was made

    def write(obj: dict[str, object]) -> None:
        writes.append(dict(obj["spec"]))  # type: ignore[call-overload]
        on_devices.append(tuple(b.private_key for b in two.backends))
        two.wgnodes.put(obj)

    two.api.on_write = write
    public, _ = two.agent.controller.rotate_key()
    after = [b.private_key for b in two.backends]
    assert all(a and a != b for a, b in zip(after, before, strict=True))
    for lane in (0, 1):
        path = two.cfg.lane_key_path(lane)
        assert keys.load(path).raw == after[lane]
        assert not keys.previous_path(path).exists()  # finished: no previous key kept
    # The spec goes from both old keys to both new ones in one write, never one lane alone
    # (the other writes are the status's, with the spec as it stood).
    lane1_public = keys.PrivateKey(after[1]).public_key_b64()  # type: ignore[arg-type]
    old = (keys.PrivateKey(before[0]).public_key_b64(), keys.PrivateKey(before[1]).public_key_b64())  # type: ignore[arg-type]
    seen = [(w["publicKey"], w["lanes"][0]["publicKey"]) for w in writes]  # type: ignore[index]
    assert set(seen) == {old, (public, lane1_public)}
    assert seen[-1] == (public, lane1_public)
    first_new = seen.index((public, lane1_public))
    assert on_devices[first_new] == tuple(after)  # every device had its key before the publish
    assert writes[-1]["publicKey"] == public
    assert writes[-1]["lanes"] == [{"publicKey": lane1_public, "listenPort": 51872}]
    # Every lane's peers are greeted, so each handshakes with the new key at once.
    assert two.backends[1].greeted()


def test_a_lost_lane_device_is_brought_back_with_its_key_and_peers(two: TwoLanes) -> None:
    k2 = [_key(), _key()]
    two.start(("n2", 2, k2))
    key1 = two.backends[1].private_key
    two.backends[1].lose()
    two.agent.controller.step(woke=False)
    assert two.backends[1].exists and two.backends[1].private_key == key1
    assert [p.public_key for p in two.backends[1].table.peers()] == [k2[1]]
    assert two.agent.watchdog.restarts == 1


def test_status_peers_and_metrics_show_the_lanes(two: TwoLanes) -> None:
    k2 = [_key(), _key()]
    two.start(("n2", 2, k2))
    servicer = api.Servicer(two.agent)
    status = servicer.GetStatus(None, None)
    assert [(lane.index, lane.device, lane.listen_port) for lane in status.lanes] == [
        (0, "podwire_wg0", 51871),
        (1, "podwire_wg0_1", 51872),
    ]
    assert status.lanes[1].public_key == keys.load(two.cfg.lane_key_path(1)).public_key_b64()
    peers = servicer.ListPeers(None, None).peers
    assert sorted((p.lane, p.node_name, p.public_key) for p in peers) == [
        (0, "n2", k2[0]),
        (1, "n2", k2[1]),
    ]
    families = {f.name: f for f in metrics.AgentCollector(two.agent).collect()}
    assert families["podwire_lanes"].samples[0].value == 2
    rx = {tuple(sorted(s.labels.items())) for s in families["podwire_peer_rx_bytes"].samples}
    assert rx == {(("lane", "0"), ("peer", "n2")), (("lane", "1"), ("peer", "n2"))}


def test_one_lane_shows_no_lanes_and_keeps_its_metric_labels(tmp_path: pathlib.Path) -> None:
    from agentfakes import AgentHarness

    h = AgentHarness(tmp_path / "private.key")
    h.start()
    h.list(OtherNode("n2", _key(), "192.0.2.2", ("10.244.2.0/24",)))
    h.step()
    assert list(api.Servicer(h.agent).GetStatus(None, None).lanes) == []
    assert {p.lane for p in api.Servicer(h.agent).ListPeers(None, None).peers} == {0}
    families = {f.name: f for f in metrics.AgentCollector(h.agent).collect()}
    assert [s.labels for s in families["podwire_peer_rx_bytes"].samples] == [{"peer": "n2"}]
    assert "lanes" not in h.api.wgnodes["n1"]["spec"]


@pytest.mark.parametrize("stored", [(1,), (1, 0)], ids=["lane1-only", "both-lanes"])
def test_a_lane_rotation_cut_short_is_finished_at_the_next_start(
    tmp_path: pathlib.Path, stored: tuple[int, ...]
) -> None:
    first = TwoLanes(tmp_path)
    first.start(("n2", 2, [_key(), _key()]))
    for lane in stored:  # the agent died after storing these lanes' new keys (lane 0 is last)
        keys.rotate(first.cfg.lane_key_path(lane))
    second = TwoLanes(tmp_path)
    second.api = first.api  # the same apiserver, still holding the old keys
    second.agent.publisher.api = first.api
    second.agent.apiserver = first.api
    second.api.on_write = second.wgnodes.put
    assert second.agent.start(threading.Event(), loop=False)
    assert second.agent.keys.interrupted
    second.nodes.list([first.api.nodes["n1"], node("n2", "192.0.2.2", ["10.244.2.0/24"])])
    second.wgnodes.list([dict(o) for o in first.api.wgnodes.values()])
    second.agent.controller.step(woke=True)
    now = [keys.load(second.cfg.lane_key_path(lane)) for lane in (0, 1)]
    assert [b.private_key for b in second.backends] == [k.raw for k in now]
    spec = second.api.wgnodes["n1"]["spec"]
    assert spec["publicKey"] == now[0].public_key_b64()
    assert spec["lanes"][0]["publicKey"] == now[1].public_key_b64()
    for lane in (0, 1):  # finished: no previous key kept on any lane
        assert keys.load_previous(second.cfg.lane_key_path(lane)) is None
    assert not second.agent.keys.interrupted
