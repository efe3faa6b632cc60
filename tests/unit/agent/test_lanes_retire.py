"""Lanes changed between two starts, on fakes: what an agent with fewer lanes than the one
before it takes away (the routes over the retired lanes first, then their devices, their key
files, and with one lane left the multipath hash), what it does when that fails, and that an
agent assembled on fakes touches no kernel setting of the machine the tests run on."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable

import pytest
from agentfakes import FakeApi, FakeApiError, FakeBackend, FakeRoutes, MemorySource, net, node

from podwire.agent import app, config, keys, reconcile, watches, wgdevice
from podwire.agent import clock as clock_mod
from podwire.agent.netlink import multipath

CLUSTER = net("10.244.0.0/16")


class PathRoutes(FakeRoutes):
    """FakeRoutes with routes over lanes (destination -> the lanes of its nexthops; -1: a
    nexthop through a device that is no lane of this agent's), logging each change."""

    def __init__(self, paths: dict[wgdevice.IPNetwork, tuple[int, ...]]) -> None:
        super().__init__()
        self.paths = dict(paths)

    def list_paths(self) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
        return dict(self.paths)

    def apply_paths(self, plan: reconcile.PathPlan) -> None:
        for dst, lanes in plan.add:
            self.paths[dst] = lanes
            self.log.append(f"route {dst} over {lanes}")
        for dst in plan.remove:
            self.paths.pop(dst, None)


class RecordingHash:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def by_flow(self) -> None:
        self.log.append("hash by flow")

    def reset(self) -> None:
        self.log.append("hash reset")


def _agent(
    tmp_path: pathlib.Path,
    lanes: int,
    routes: PathRoutes,
    *,
    retire: Callable[[int], str | None] | None = None,
    flow_hash: RecordingHash | None = None,
) -> tuple[app.Agent, list[FakeBackend]]:
    cfg = config.Config(
        node_name="n1",
        key_path=tmp_path / "private.key",
        cluster_pod_cidrs=(CLUSTER,),
        lanes=lanes,
    )
    api = FakeApi()
    api.nodes["n1"] = node("n1", "192.0.2.1", ["10.244.1.0/24"])
    wakeup = threading.Event()
    wgnodes = MemorySource("wgnodes", on_change=wakeup.set)
    api.on_write = wgnodes.put
    backends = [FakeBackend(log=routes.log) for _ in range(lanes)]

    def open_lane(lane: int) -> Callable[[str | None, str], FakeBackend]:
        return lambda _address, _datapath: backends[lane]

    agent = app.assemble(
        cfg,
        api=api,
        api_error=FakeApiError,
        emit=api.emit_event,
        watched=watches.Watches(MemorySource("nodes", on_change=wakeup.set), wgnodes),
        wakeup=wakeup,
        open_backend=lambda _address: backends[0],
        open_lane=open_lane,
        routes=routes,
        clock=clock_mod.FakeClock(),
        retire_lane=retire,
        flow_hash=flow_hash,
    )
    return agent, backends


def test_lowered_to_one_lane_the_routes_narrow_before_the_old_lanes_go(
    tmp_path: pathlib.Path,
) -> None:
    # An agent with three lanes left a multipath route over them: to lanes 1 and 2 (devices
    # that are no lanes of this agent's) and lane 0.
    routes = PathRoutes({net("10.244.2.0/24"): (-1, -1, 0), net("10.244.3.0/24"): (0,)})
    asked: list[int] = []

    def retire(lane: int) -> str | None:
        asked.append(lane)
        routes.log.append(f"retire {lane}")
        return f"lane {lane}'s device" if lane in (1, 2) else None

    agent, _ = _agent(tmp_path, 1, routes, retire=retire, flow_hash=RecordingHash(routes.log))
    assert agent.start(threading.Event(), loop=False)
    assert asked == list(range(1, config.MAX_LANES))
    tail = routes.log[routes.log.index("device") + 1 :]
    assert tail[: tail.index("retire 1")] == ["route 10.244.2.0/24 over (0,)"]
    assert tail[-1] == "hash reset"  # one lane left: the hash back to the kernel's default
    assert routes.paths == {net("10.244.2.0/24"): (0,), net("10.244.3.0/24"): (0,)}
    assert agent.datapath.retired == (
        "lane 1's device",
        "lane 2's device",
        "multipath hash back to layer 3 (the kernel's default)",
    )


def test_nothing_left_behind_means_nothing_done(tmp_path: pathlib.Path) -> None:
    routes = PathRoutes({net("10.244.2.0/24"): (0,)})
    agent, _ = _agent(
        tmp_path, 1, routes, retire=lambda _lane: None, flow_hash=RecordingHash(routes.log)
    )
    assert agent.start(threading.Event(), loop=False)
    assert routes.log == ["fail_closed", "device"]  # no route touched, no hash reset
    assert agent.datapath.retired == ()


def test_a_lane_that_cannot_be_retired_is_logged_and_the_agent_starts(
    tmp_path: pathlib.Path,
) -> None:
    routes = PathRoutes({})

    def retire(lane: int) -> str | None:
        if lane == 1:
            raise OSError("the engine would not end")
        return f"lane {lane}'s device" if lane == 2 else None

    agent, backends = _agent(tmp_path, 2, routes, retire=retire, flow_hash=RecordingHash([]))
    assert agent.start(threading.Event(), loop=False)
    assert agent.started and all(b.exists for b in backends)
    assert agent.datapath.retired == ("lane 2's device",)  # two lanes stay: the hash stays


def test_routes_that_cannot_be_narrowed_keep_every_old_lane(tmp_path: pathlib.Path) -> None:
    class Unreadable(PathRoutes):
        def list_paths(self) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
            raise OSError("netlink said no")

    asked: list[int] = []
    agent, _ = _agent(tmp_path, 1, Unreadable({}), retire=lambda lane: asked.append(lane))  # type: ignore[func-returns-value]
    assert agent.start(threading.Event(), loop=False)
    assert asked == []  # a device taken away now would take its flows' routes with it


def test_the_key_files_of_lanes_no_longer_there_are_removed(tmp_path: pathlib.Path) -> None:
    cfg = config.Config(
        node_name="n1", key_path=tmp_path / "private.key", cluster_pod_cidrs=(CLUSTER,)
    )
    for lane in (0, 1, 2):
        keys.load_or_create(cfg.lane_key_path(lane))
    keys.rotate(cfg.lane_key_path(2))  # a rotation of lane 2 cut short: its previous key kept
    lane1 = keys.load(cfg.lane_key_path(1))
    agent, _ = _agent(tmp_path, 2, PathRoutes({}))
    assert agent.start(threading.Event(), loop=False)
    assert sorted(p.name for p in tmp_path.iterdir() if "key" in p.name) == [
        "private-lane1.key",
        "private.key",
    ]
    assert agent.keys.lane_key(1) == lane1  # the lane that stays keeps its key
    assert not agent.keys.interrupted  # lane 2's cut-short rotation is not this agent's
    # Raised again later, the lane gets a new key.
    again, _ = _agent(tmp_path, 3, PathRoutes({}))
    assert again.start(threading.Event(), loop=False)
    assert (tmp_path / "private-lane2.key").exists()


def test_lanes_set_the_hash_by_flow_and_fakes_touch_no_kernel_setting(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(name: str, value: int) -> None:
        raise AssertionError(f"a unit test wrote /proc/sys/{name}")

    monkeypatch.setattr(multipath, "_read", lambda name: 0)  # as a kernel at its default
    monkeypatch.setattr(multipath, "_write", refuse)
    log: list[str] = []
    agent, _ = _agent(tmp_path, 2, PathRoutes({}), flow_hash=RecordingHash(log))
    assert agent.start(threading.Event(), loop=False)
    assert log == ["hash by flow"]
    bare, _ = _agent(tmp_path / "bare", 2, PathRoutes({}))  # no flow_hash: the fakes' way
    assert bare.start(threading.Event(), loop=False)


def test_external_engines_may_carry_lanes() -> None:
    cfg = config.from_mapping(
        {"node_name": "n1", "lanes": 2, "engine_mode": "external", "datapath": "userspace"},
        base={"cluster_pod_cidrs": "10.244.0.0/16"},
    )
    assert (cfg.lanes, cfg.engine_mode, cfg.lane_device(1)) == (2, "external", "podwire_wg0_1")
