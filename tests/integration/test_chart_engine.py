"""The chart's userspace engine outlives the agent's container: real agents, real engines.

The chart runs podwire-engine as its own DaemonSet (hostNetwork, its own update strategy) and
the agent with engine mode `external`, the two sharing /var/run/wireguard. Here each node's
engine is started the way that DaemonSet starts it (`podwire-engine DEVICE` in the foreground,
in the node's network, by nobody but the test), and the agents run against the real apiserver:

    node1 [engine] [agent, external]  ==underlay==  node2 [engine] [agent, external]
      pod 10.244.1.10  ---------- 100 pings/s ---------->  pod 10.244.2.10

A container's restart kills every process of the container, so "killing the agent's
container" is SIGKILL to the agent and every process it started. In child mode that takes the
engine with it (the control below: packets are lost, none in clear); in external mode the
engine is not the agent's, and not one packet is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import record, topology, verify

PINGS = 600  # 6 s at 100 a second, while the agent's container is killed and started again
MARKER_SIZE = 24
T = TypeVar("T")


def _start_engine(cluster: topology.Cluster, node: record.Node) -> subprocess.Popen[bytes]:
    """podwire-engine for node's device, as the engine DaemonSet's container runs it."""
    proc = cluster.factory.spawn(
        node.ns,
        [str(topology.BIN / "podwire-engine"), node.device],
        log_path=node.workdir / "engine.log",
        env={"WG_PROCESS_FOREGROUND": "1"},
    )
    socket = topology.UAPI_DIR / f"{node.device}.sock"
    netns_mod.wait_until(
        lambda: netns_mod.unix_socket_answers(socket) or proc.poll() is not None,
        timeout=15,
        what=f"{node.name}'s engine to serve {socket}",
    )
    assert proc.poll() is None, (node.workdir / "engine.log").read_text()
    return proc


def _start_agent(cluster: topology.Cluster, node: record.Node, mode: str) -> None:
    cluster.start_agent(node, env={"PODWIRE_ENGINE_MODE": mode})


def _ready(cluster: topology.Cluster, name: str, *, peers: int) -> bool:
    out = cluster.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    status = json.loads(out.stdout).get("status", {})
    conditions = status.get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return ready and status.get("peers") == peers


def _wait_ready(cluster: topology.Cluster, *names: str) -> None:
    netns_mod.wait_until(
        lambda: all(_ready(cluster, n, peers=1) for n in names),
        timeout=60,
        what=f"{', '.join(names)} Ready with their peer",
    )


def _readyz(node: record.Node) -> tuple[int, str]:
    """The agent's /readyz, as the kubelet's probe reads it on the node."""
    script = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen('http://127.0.0.1:9871/readyz', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    out = node.ns.run(sys.executable, "-c", script, check=False).stdout
    code, _, body = out.partition("\n")
    return int(code or 0), body


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_agent_container(cluster: topology.Cluster, node: record.Node) -> list[int]:
    """SIGKILL to node's agent and every process it started, as a container's restart does;
    returns the PIDs killed."""
    (agent,) = [p for p in cluster.record.find("agent", node.name) if p.alive()]
    pids = [agent.pid, *_descendants(agent.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    netns_mod.wait_until(lambda: not agent.alive(), timeout=5, what="the agent gone")
    cluster.stop_agent(node)  # reaps it and drops it from the record
    return pids


def _stream(
    cluster: topology.Cluster,
    pings: int,
    tmp_path: pathlib.Path,
    during: Callable[[subprocess.Popen[str]], T],
) -> tuple[str, verify.Analysis, T]:
    """100 pings a second from node1's pod to node2's, captured on the underlay, while
    `during` does to node2 what the test is about; the ping's summary, what the capture saw,
    and what `during` returned."""
    n1, n2 = cluster.nodes["node1"], cluster.nodes["node2"]
    marker = secrets.token_hex(MARKER_SIZE // 2).encode()
    with verify.Capture(cluster.record, tmp_path / "underlay.pcap") as capture:
        ping = subprocess.Popen(
            n1.pods[0].ns.exec_args(
                ["ping", "-n", "-q", "-i", "0.01", "-c", str(pings), "-W", "1",
                 "-p", marker.hex()[:32], n2.pods[0].ip]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            result = during(ping)
            out, _ = ping.communicate(timeout=60)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
        frames = capture.stop()
    pod_ips = [p.ip for n in (n1, n2) for p in n.pods]
    return out, verify.analyze(frames, pod_ips, marker[:16], topology.LISTEN_PORT), result


def _stream_while_restarting(
    cluster: topology.Cluster, mode: str, tmp_path: pathlib.Path
) -> tuple[str, verify.Analysis, list[int]]:
    """The stream while node2's agent container is killed and started again; the ping's
    summary, the underlay's capture, the PIDs killed."""
    n2 = cluster.nodes["node2"]

    def restart(_ping: subprocess.Popen[str]) -> list[int]:
        killed = _kill_agent_container(cluster, n2)
        _start_agent(cluster, n2, mode)
        return killed

    out, analysis, killed = _stream(cluster, PINGS, tmp_path, restart)
    summary = [line for line in out.splitlines() if "packets transmitted" in line]
    print(f"engine mode {mode}: {summary}; {analysis}")
    return out, analysis, killed


def test_the_agent_in_external_mode_waits_for_the_engine_and_its_restart_loses_nothing(
    cluster: topology.Cluster, netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    n1, n2 = cluster.add_node("node1"), cluster.add_node("node2")
    engine2 = _start_engine(cluster, n2)
    _start_agent(cluster, n2, "external")

    # node1's agent comes before its engine: it starts none, says what it waits for, is not
    # Ready, and the fail-closed backstop drops node1's pod traffic meanwhile.
    _start_agent(cluster, n1, "external")
    log = n1.workdir / "agent.log"
    netns_mod.wait_until(
        lambda: "engine_absent" in log.read_text(), timeout=30, what="node1's agent to say so"
    )
    socket = str(topology.UAPI_DIR / f"{n1.device}.sock")
    assert socket in log.read_text() and "external" in log.read_text()
    code, body = _readyz(n1)
    assert code == 503, body
    assert not n1.ns.link_exists(n1.device), "the agent started an engine in external mode"
    assert not n1.pods[0].ns.ping(n2.pods[0].ip, count=1, timeout=2)
    route = n1.ns.run("ip", "route", "get", n2.pods[0].ip, check=False)
    assert route.returncode != 0 and "No route to host" in route.stderr, route

    engine1 = _start_engine(cluster, n1)
    _wait_ready(cluster, "node1", "node2")
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=2, timeout=10)

    out, seen, killed = _stream_while_restarting(cluster, "external", tmp_path)
    assert engine2.pid not in killed and engine2.poll() is None and engine1.poll() is None
    assert f"{PINGS} received" in out and " 0% packet loss" in out, out
    assert seen.clear == 0 and seen.payload == 0, seen.examples
    assert seen.transport > 0, seen
    _wait_ready(cluster, "node1", "node2")
    assert "engine_found" in log.read_text()  # node1's agent, once its engine came


def test_control_in_child_mode_the_containers_restart_takes_the_engine_and_its_packets(
    cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    # The same kill and stream, but the agents start their engines (the default child mode):
    # the engine dies with the agent's container, so packets are lost (fail-closed: none in
    # clear). Without this the test above could pass by killing nothing that matters.
    n1, n2 = cluster.add_node("node1"), cluster.add_node("node2")
    for node in (n1, n2):
        _start_agent(cluster, node, "child")
    _wait_ready(cluster, "node1", "node2")
    out, seen, killed = _stream_while_restarting(cluster, "child", tmp_path)
    assert len(killed) >= 2, "the agent had started no engine"
    assert f"{PINGS} received" not in out, out
    assert seen.clear == 0 and seen.payload == 0, seen.examples
    _wait_ready(cluster, "node1", "node2")
    assert n1.pods[0].ns.ping(n2.pods[0].ip, count=2, timeout=10)


ENGINE_UPGRADE_PINGS = 1000  # 10 s at 100 a second; node2's engine is replaced after 2 s


def test_upgrading_the_engine_itself_is_a_short_fail_closed_gap(
    cluster: topology.Cluster, tmp_path: pathlib.Path
) -> None:
    # What OnDelete means for the engine's own upgrade: its pod is deleted (SIGTERM: the engine
    # removes its device and socket), the new pod's engine starts, and the agent, which never
    # restarted, finds the new socket, brings the device back and programs its peers again.
    # Meanwhile the fail-closed backstop drops node2's pod traffic: a gap, never clear text.
    n1, n2 = cluster.add_node("node1"), cluster.add_node("node2")
    engines = {n.name: _start_engine(cluster, n) for n in (n1, n2)}
    for node in (n1, n2):
        _start_agent(cluster, node, "external")
    _wait_ready(cluster, "node1", "node2")
    src, dst = n1.pods[0], n2.pods[0]
    assert src.ns.ping(dst.ip, count=2, timeout=10)

    def upgrade(ping: subprocess.Popen[str]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            ping.wait(timeout=2)  # two seconds of the stream, then the upgrade
        netns_mod.stop_process(engines["node2"], grace=10)
        # The new pod's engine comes once the old pod is gone; meanwhile the agent starts
        # none, and says what is missing on /readyz.
        netns_mod.wait_until(
            lambda: _readyz(n2)[0] == 503, timeout=15, what="node2's agent not ready"
        )
        body = _readyz(n2)[1]
        absent = f"no userspace engine serves {topology.UAPI_DIR / f'{n2.device}.sock'}"
        assert absent in body and "fail-closed holds" in body, body
        _start_engine(cluster, n2)

    out, seen, _ = _stream(cluster, ENGINE_UPGRADE_PINGS, tmp_path, upgrade)
    summary = [line for line in out.splitlines() if "packets transmitted" in line]
    print(f"engine upgrade: {summary}; {seen}")
    assert seen.clear == 0 and seen.payload == 0, seen.examples
    received = int(out.split(" received")[0].rsplit(" ", 1)[1])
    lost = ENGINE_UPGRADE_PINGS - received
    assert 0 < lost < ENGINE_UPGRADE_PINGS // 2, out  # a gap, and the stream came back
    _wait_ready(cluster, "node1", "node2")
    assert src.ns.ping(dst.ip, count=2, timeout=10)
    assert "device_restored" in (n2.workdir / "agent.log").read_text()
    # The engine that serves node2 now is the new one's pod, never one its agent started.
    (agent,) = [p for p in cluster.record.find("agent", "node2") if p.alive()]
    assert not _descendants(agent.pid), "the agent started an engine of its own"
