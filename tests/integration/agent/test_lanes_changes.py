"""Changing `lanes` at a restart, and lanes with engines the agent does not start.

Real agents, podwire-engine per lane in each node's namespace, the real apiserver:

    pod --- node1 [wg, wg_1] === underlay bridge === [wg, wg_1] node2 --- pod

- Lowering: node1's agent restarted with one lane leaves no lane 1 behind: its device, its
  engine and UAPI socket, its key file, the multipath routes over it, its spec and status
  lanes; node2 drops node1's lane 1 peer and routes to node1 over lane 0; traffic flows.
- Raising: node1's agent restarted with two lanes brings lane 1 up, and routes both ways are
  multipath over both lanes.
- Engine mode external (the chart's engine DaemonSet): the test starts one podwire-engine per
  lane as that DaemonSet's containers do; the agent starts none, waits for every lane's socket
  and configures them; flows travel over both lanes. Lowered there, the retired lane's engine
  (the DaemonSet's container, which runs on until its pod is made again) is left running but
  emptied of peers and out of the routes.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
from underlay import capture_underlay

from podwire.agent.netlink import routes as nl_routes
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import topology
from tests.integration.agent.test_lanes import (
    FLOWS,
    UAPI_DIR,
    Flows,
    _cli,
    _engine_pid,
    _lane,
    _peers,
    _read,
    _route,
    _settled,
    _start,
    _wgnode,
    lanes_cluster,  # a fixture, used by name
)

__all__ = ["lanes_cluster"]


def _restart(cluster: topology.Cluster, node: topology.Node, lanes: int, **env: str) -> None:
    """The node's agent stopped (SIGTERM: its engines outlive it) and started with `lanes`."""
    cluster.stop_agent(node)
    cluster.start_agent(node, env={"PODWIRE_LANES": str(lanes), **env})


def _metrics(node: topology.Node) -> str:
    script = (
        "import urllib.request\n"
        "print(urllib.request.urlopen('http://127.0.0.1:9871/metrics', timeout=5).read().decode())"
    )
    return node.ns.run(sys.executable, "-c", script).stdout


def _readyz(node: topology.Node) -> str:
    """The agent's /readyz body, as the kubelet's probe reads it (503 while not ready)."""
    script = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    print(urllib.request.urlopen('http://127.0.0.1:9871/readyz', timeout=5).read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    return node.ns.run(sys.executable, "-c", script).stdout


def _running(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its reaper does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _lane_key(node: topology.Node, lane: int) -> pathlib.Path:
    path = node.key_path
    return path.with_name(f"{path.stem}-lane{lane}{path.suffix}")


def _all_arrive(cluster: topology.Cluster, src: topology.Pod, dst: topology.Pod) -> None:
    sent, got, damaged = Flows(cluster, src, dst, rate=50, seconds=1).result()
    assert damaged == 0
    assert {int(p): n for p, n in got.items()} == {40000 + k: n for k, n in enumerate(sent)}


def _both_ways_nothing_in_clear(
    cluster: topology.Cluster, n1: topology.Node, n2: topology.Node, tmp_path: pathlib.Path
) -> None:
    """Flows from node1's pod to node2's and back arrive whole, and the underlay carries none
    of their packets in clear."""
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    try:
        _all_arrive(cluster, n1.pods[0], n2.pods[0])
        _all_arrive(cluster, n2.pods[1], n1.pods[1])
    finally:
        netns_mod.stop_process(clear)
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)


def test_lowering_lanes_at_a_restart_leaves_no_lane_behind(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 2})
    lane1 = _lane(n1, 1)
    engine = _engine_pid(n1, lane1)
    assert engine is not None and (UAPI_DIR / f"{lane1}.sock").exists()
    assert _lane_key(n1, 1).exists()

    _restart(cluster, n1, 1)
    netns_mod.wait_until(
        lambda: _settled(cluster, {"node1": 1, "node2": 2}) and len(_peers(n2, _lane(n2, 1))) == 0,
        timeout=90,
        what="node1 on one lane, node2 without node1's lane 1",
    )
    # Lane 1 of node1 is gone: its device, its engine, its socket and its key.
    assert not n1.ns.link_exists(lane1), "lane 1's device was left behind"
    assert _engine_pid(n1, lane1) is None, "lane 1's engine was left running"
    assert not _running(engine), "lane 1's engine still runs"
    assert not (UAPI_DIR / f"{lane1}.sock").exists(), "lane 1's socket was left behind"
    assert not _lane_key(n1, 1).exists(), "lane 1's key file was left behind"
    # Routes both ways are single-path over lane 0.
    for a, b in ((n1, n2), (n2, n1)):
        route = _route(a, b.pod_cidr)
        assert f"dev {_lane(a, 0)}" in route and "nexthop" not in route, f"{a.name}: {route}"
    # The WireguardNode says one lane; node2 keeps node1 on its lane 0 alone.
    obj = _wgnode(cluster, "node1")
    assert "lanes" not in obj["spec"] and obj["status"]["lanes"] == 1
    assert [k for k, _ in _peers(n2, _lane(n2, 0))] == [obj["spec"]["publicKey"]]
    # podwire status, peers and the metrics show one lane.
    status = _cli(n1, "status")
    assert "lanes:" not in status and lane1 not in status, status
    table = _cli(n1, "peers").splitlines()
    assert table[0].split()[:2] == ["NODE", "PUBLIC"] and len(table) == 2, table
    metrics = _metrics(n1)
    assert "podwire_lanes 1.0" in metrics and 'lane="' not in metrics, metrics

    _both_ways_nothing_in_clear(cluster, n1, n2, tmp_path)


def test_raising_lanes_at_a_restart_brings_the_new_lane_into_the_routes(
    lanes_cluster: topology.Cluster,
) -> None:
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 1, "node2": 2})
    assert "nexthop" not in _route(n2, n1.pod_cidr)
    _restart(cluster, n1, 2)
    netns_mod.wait_until(
        lambda: _settled(cluster, {"node1": 2, "node2": 2}) and len(_peers(n2, _lane(n2, 1))) == 1,
        timeout=90,
        what="node1 on two lanes, node2 with node1's lane 1",
    )
    spec1 = _wgnode(cluster, "node1")["spec"]
    assert _peers(n2, _lane(n2, 1)) == [(spec1["lanes"][0]["publicKey"], f"{n1.underlay_ip}:51872")]
    for a, b in ((n1, n2), (n2, n1)):
        route = _route(a, b.pod_cidr)
        assert all(f"nexthop dev {_lane(a, i)}" in route for i in (0, 1)), f"{a.name}: {route}"
    _all_arrive(cluster, n1.pods[0], n2.pods[0])
    _all_arrive(cluster, n2.pods[1], n1.pods[1])


def _start_engine(cluster: topology.Cluster, node: topology.Node, device: str) -> int:
    """podwire-engine for one lane's device, as the engine DaemonSet's container runs it."""
    log = node.workdir / f"{device}-engine.log"
    proc = cluster.factory.spawn(
        node.ns,
        [str(topology.BIN / "podwire-engine"), device],
        log_path=log,
        env={"WG_PROCESS_FOREGROUND": "1"},
    )
    socket = UAPI_DIR / f"{device}.sock"
    netns_mod.wait_until(
        lambda: netns_mod.unix_socket_answers(socket) or proc.poll() is not None,
        timeout=15,
        what=f"{node.name}'s engine to serve {socket}",
    )
    assert proc.poll() is None, log.read_text()
    return proc.pid


def _rx(node: topology.Node, device: str) -> int:
    """Bytes the device received from its peers."""
    out = node.ns.run("wg", "show", device, "transfer").stdout
    return sum(int(line.split("\t")[1]) for line in out.strip().splitlines())


def test_external_engines_one_per_lane_carry_flows_over_every_lane(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    cluster = lanes_cluster
    lanes = 2
    n1, n2 = (
        cluster.add_node(name, device=cluster.factory.unique("w")) for name in ("node1", "node2")
    )
    env = {"PODWIRE_LANES": str(lanes), "PODWIRE_ENGINE_MODE": "external"}
    engines = {_lane(n2, i): _start_engine(cluster, n2, _lane(n2, i)) for i in range(lanes)}
    cluster.start_agent(n2, env=env)
    # node1's agent comes before its engines: it starts none and waits for each lane's socket.
    cluster.start_agent(n1, env=env)
    engines[_lane(n1, 0)] = _start_engine(cluster, n1, _lane(n1, 0))
    log = n1.workdir / "agent.log"
    netns_mod.wait_until(
        lambda: f"{_lane(n1, 1)}.sock" in log.read_text(),
        timeout=30,
        what="node1's agent to say it waits for lane 1's engine",
    )
    assert not n1.ns.link_exists(_lane(n1, 1)), "the agent started an engine in external mode"
    waiting = _readyz(n1)
    assert waiting.startswith("503") and "2 lanes' userspace engines" in waiting, waiting
    engines[_lane(n1, 1)] = _start_engine(cluster, n1, _lane(n1, 1))
    netns_mod.wait_until(
        lambda: _settled(cluster, {"node1": lanes, "node2": lanes}),
        timeout=90,
        what="both agents Ready on two lanes",
    )
    # Every lane's engine is the one the test started: the agents started none.
    for node in (n1, n2):
        for i in range(lanes):
            assert _engine_pid(node, _lane(node, i)) == engines[_lane(node, i)]
    for a, b in ((n1, n2), (n2, n1)):
        route = _route(a, b.pod_cidr)
        assert all(f"nexthop dev {_lane(a, i)}" in route for i in range(lanes)), route

    before = [_rx(n2, _lane(n2, i)) for i in range(lanes)]
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    try:
        _all_arrive(cluster, n1.pods[0], n2.pods[0])
    finally:
        netns_mod.stop_process(clear)
    grew = [_rx(n2, _lane(n2, i)) - before[i] for i in range(lanes)]
    print(f"\n{FLOWS} flows, bytes received per lane: {grew}")
    assert all(g > 0 for g in grew), f"a lane carried nothing: {grew}"
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)


def test_lowering_lanes_with_external_engines_empties_the_lane_the_daemonset_still_runs(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    """With the engine DaemonSet (OnDelete) a lowered lane's container runs on until its pod
    is made again: the agent neither ends it nor routes over it, and empties it of peers."""
    cluster = lanes_cluster
    n1, n2 = (cluster.add_node(n, device=cluster.factory.unique("w")) for n in ("node1", "node2"))
    engines = {
        (node.name, i): _start_engine(cluster, node, _lane(node, i))
        for node in (n1, n2)
        for i in (0, 1)
    }
    env = {"PODWIRE_LANES": "2", "PODWIRE_ENGINE_MODE": "external"}
    for node in (n1, n2):
        cluster.start_agent(node, env=env)
    netns_mod.wait_until(
        lambda: _settled(cluster, {"node1": 2, "node2": 2}), timeout=90, what="two lanes each"
    )
    assert len(_peers(n1, _lane(n1, 1))) == 1

    _restart(cluster, n1, 1, PODWIRE_ENGINE_MODE="external")
    netns_mod.wait_until(
        lambda: _settled(cluster, {"node1": 1, "node2": 2}) and not _peers(n2, _lane(n2, 1)),
        timeout=90,
        what="node1 on one lane, node2 without node1's lane 1",
    )
    assert _engine_pid(n1, _lane(n1, 1)) == engines[("node1", 1)], "the DaemonSet's to end"
    assert _peers(n1, _lane(n1, 1)) == [], "the retired lane still has peers"
    assert not _lane_key(n1, 1).exists()
    for a, b in ((n1, n2), (n2, n1)):
        route = _route(a, b.pod_cidr)
        assert f"dev {_lane(a, 0)}" in route and "nexthop" not in route, f"{a.name}: {route}"
    _both_ways_nothing_in_clear(cluster, n1, n2, tmp_path)


@pytest.mark.parametrize("after", [1, 2], ids=["lowered-to-1", "control-kept-at-2"])
def test_lowering_lanes_under_traffic_never_leaves_the_lowered_node_without_its_route(
    lanes_cluster: topology.Cluster, tmp_path: pathlib.Path, after: int
) -> None:
    """node1's agent restarted from two lanes to one while 8 flows run each way: its route to
    node2's pods goes from both lanes to lane 0 in place, never deleted (a deleted route would
    send its flows to the backstop) before lane 1's device goes. What node2 sends over lane 1
    until it reads node1's WireguardNode is dropped (encrypted), and counted. The control
    restarts node1's agent with its two lanes, for what a restart alone loses here."""
    cluster = lanes_cluster
    n1, n2 = _start(cluster, {"node1": 2, "node2": 2})
    # The kernel says nothing when a device's deletion takes its routes: look, every 10 ms.
    show = f"ip -o route show table {nl_routes.TABLE} {n2.pod_cidr}"
    watch = f'while :; do out=$({show}); echo "${{out:-missing}}"; sleep 0.01; done'
    monitor_log = tmp_path / "routes.log"
    monitor = cluster.factory.spawn(n1.ns, ["sh", "-c", watch], log_path=monitor_log)
    clear, clear_pcap = capture_underlay(cluster, tmp_path)
    try:
        out = Flows(cluster, n1.pods[0], n2.pods[0], rate=100, seconds=10)
        back = Flows(cluster, n2.pods[1], n1.pods[1], rate=100, seconds=10)
        netns_mod.wait_until(lambda: _rx(n2, _lane(n2, 1)) > 0, timeout=10, what="lane 1 busy")
        _restart(cluster, n1, after)
        netns_mod.wait_until(
            lambda: (
                _settled(cluster, {"node1": after, "node2": 2})
                and bool(_peers(n2, _lane(n2, 1))) == (after == 2)
            ),
            timeout=60,
            what=f"node1 on {after} lanes",
        )
        results = {"node1 -> node2": out.result(), "node2 -> node1": back.result()}
    finally:
        netns_mod.stop_process(clear)
        netns_mod.stop_process(monitor)
    seen = monitor_log.read_text().splitlines()
    assert "nexthop" in seen[0], seen[0]
    assert ("nexthop" in seen[-1]) == (after == 2) and f"dev {_lane(n1, 0)}" in seen[-1], seen[-1]
    missing = seen.count("missing")
    print(
        f"\nlanes 2 -> {after}: the route to node2's pods was missing in {missing} of {len(seen)} looks"
    )
    assert missing == 0, "node1's flows to node2 met the backstop"
    for direction, (sent, got, damaged) in results.items():
        assert damaged == 0
        per_flow = [n - got.get(str(40000 + k), 0) for k, n in enumerate(sent)]
        print(
            f"lanes 2 -> {after} under traffic, {direction}: lost per flow {per_flow} of {sent[0]}"
        )
    leaked = _read(clear_pcap)
    assert not leaked, "pod traffic in clear on the underlay:\n" + "\n".join(leaked)
