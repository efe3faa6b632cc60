"""The chart with lanes, as the real helm renders it and the real apiserver takes it.

With the engine DaemonSet (agent.datapath=userspace, engine.enabled), every lane has an engine
container of its own: lane 0's is `engine` for agent.device, as it always was; lane i's is
`engine-<i>` for `<device>_<i>`, declaring listenPort + i and ready once its own UAPI socket
answers. The agent declares no WireGuard port then (the engine's pod does, as host ports) and
runs in engine mode external. The schema still refuses a lane count outside 1..8.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from podwire.sandbox import controlplane, tools
from tests.integration.test_chart_values import CHART, CIDRS

USERSPACE = ("--set", CIDRS, "--set", "agent.datapath=userspace")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.path("helm"), *args], capture_output=True, text=True, timeout=120)


def _render(*args: str) -> dict[str, dict[str, Any]]:
    """The rendered DaemonSets' pod specs by component (agent, engine)."""
    proc = _helm("template", "podwire", str(CHART), *args)
    assert proc.returncode == 0, proc.stderr
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]
        for d in yaml.safe_load_all(proc.stdout)
        if d and d["kind"] == "DaemonSet"
    }


def _engines(pod: dict[str, Any]) -> list[tuple[str, list[str], list[tuple[str, int]], str]]:
    """Each engine container: name, args, (port name, port), the socket its probe tests."""
    return [
        (
            c["name"],
            c["args"],
            [(p["name"], p["containerPort"]) for p in c["ports"]],
            c["readinessProbe"]["exec"]["command"][-1],
        )
        for c in pod["containers"]
    ]


def test_two_lanes_render_an_engine_container_per_lane() -> None:
    pods = _render(*USERSPACE, "--set", "agent.lanes=2")
    assert _engines(pods["engine"]) == [
        ("engine", ["podwire-engine", "podwire_wg0"], [("wireguard", 51871)],
         "/var/run/wireguard/podwire_wg0.sock"),
        ("engine-1", ["podwire-engine", "podwire_wg0_1"], [("wireguard-1", 51872)],
         "/var/run/wireguard/podwire_wg0_1.sock"),
    ]  # fmt: skip
    for container in pods["engine"]["containers"]:  # each lane's engine as lane 0's
        assert container["securityContext"]["capabilities"] == {
            "add": ["NET_ADMIN"],
            "drop": ["ALL"],
        }
        assert {m["mountPath"] for m in container["volumeMounts"]} == {
            "/var/run/wireguard",
            "/dev/net/tun",
        }
    (agent,) = pods["agent"]["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert (env["PODWIRE_LANES"], env["PODWIRE_ENGINE_MODE"]) == ("2", "external")
    # Host ports: only the engine's pod declares WireGuard's.
    assert [p["name"] for p in agent["ports"]] == ["metrics"]


def test_lanes_follow_the_device_and_port_and_one_lane_renders_as_before() -> None:
    pods = _render(
        *USERSPACE, "--set", "agent.lanes=3", "--set", "agent.device=wgp",
        "--set", "agent.listenPort=40000",
    )  # fmt: skip
    assert [(name, args[1], ports) for name, args, ports, _ in _engines(pods["engine"])] == [
        ("engine", "wgp", [("wireguard", 40000)]),
        ("engine-1", "wgp_1", [("wireguard-1", 40001)]),
        ("engine-2", "wgp_2", [("wireguard-2", 40002)]),
    ]
    one = _render(*USERSPACE)
    assert _engines(one["engine"]) == [
        ("engine", ["podwire-engine", "podwire_wg0"], [("wireguard", 51871)],
         "/var/run/wireguard/podwire_wg0.sock"),
    ]  # fmt: skip
    # Without the engine DaemonSet the agent starts the engines and declares every lane's port.
    auto = _render("--set", CIDRS, "--set", "agent.lanes=2")
    assert "engine" not in auto
    (agent,) = auto["agent"]["containers"]
    assert [(p["name"], p["containerPort"]) for p in agent["ports"]] == [
        ("wireguard", 51871),
        ("wireguard-1", 51872),
        ("metrics", 9871),
    ]


@pytest.mark.parametrize(
    ("value", "says"),
    [("0", "minimum: got 0, want 1"), ("9", "maximum: got 9, want 8"), ("two", "integer")],
)
def test_the_schema_keeps_refusing_a_bad_lane_count(value: str, says: str) -> None:
    for command in ("template", "lint"):
        proc = _helm(command, "podwire", str(CHART), *USERSPACE, "--set", f"agent.lanes={value}")
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command} took agent.lanes={value}"
        assert "at '/agent/lanes'" in text and says in text, text


@pytest.fixture
def namespace(crds: controlplane.ControlPlane) -> Iterator[str]:
    # Without kube-controller-manager a deleted namespace stays Terminating: one name per run.
    name = f"podwire-lanes-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_the_server_takes_the_engine_daemonset_with_lanes(
    crds: controlplane.ControlPlane, namespace: str
) -> None:
    proc = _helm(
        "install", "podwire", str(CHART), "--dry-run=server", "--kubeconfig",
        str(crds.kubeconfig), "-n", namespace, *USERSPACE, "--set", "agent.lanes=4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = proc.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0]
    engine = next(
        d
        for d in yaml.safe_load_all(manifest)
        if d and d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-engine")
    )
    names = [c["name"] for c in engine["spec"]["template"]["spec"]["containers"]]
    assert names == ["engine", "engine-1", "engine-2", "engine-3"]


def test_a_device_name_with_no_room_for_the_lane_suffix_is_refused() -> None:
    for command in ("template", "lint"):
        long = _helm(command, "podwire", str(CHART), *USERSPACE, "--set", "agent.lanes=2",
                     "--set", "agent.device=fourteen_chars")  # fmt: skip
        text = long.stdout + long.stderr
        assert long.returncode != 0, f"helm {command} took a 16-character lane device"
        assert '"fourteen_chars_1", longer than the 15 characters' in text, text
    # One lane needs no suffix, and 13 characters leave room for `_1`.
    assert _render(*USERSPACE, "--set", "agent.device=fourteen_chars")
    pods = _render(*USERSPACE, "--set", "agent.lanes=2", "--set", "agent.device=thirteen_chrs")
    assert [c["args"][1] for c in pods["engine"]["containers"]] == [
        "thirteen_chrs",
        "thirteen_chrs_1",
    ]
