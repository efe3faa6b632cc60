"""`helm install --dry-run=server` of the chart against the real kube-apiserver: the server
validates every object the chart makes, with the defaults and with every option changed; the
schema stops a wrong value before anything reaches the server; NOTES.txt says what to run next."""

from __future__ import annotations

import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import yaml

from podwire.sandbox import controlplane, tools
from tests.integration.test_chart_values import CHART, EVERY_OPTION_CHANGED

CIDRS = "agent.clusterPodCIDRs=10.244.0.0/16"


@pytest.fixture(scope="module")
def namespace(crds: controlplane.ControlPlane) -> Iterator[str]:
    # Without kube-controller-manager a deleted namespace stays Terminating: one name per run.
    name = f"podwire-install-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _install(
    cp: controlplane.ControlPlane, namespace: str, *args: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        tools.path("helm"), "install", "podwire", str(CHART), "--dry-run=server",
        "--kubeconfig", str(cp.kubeconfig), "-n", namespace, *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _manifest_kinds(out: str) -> list[str]:
    manifest = out.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0]
    return sorted(d["kind"] for d in yaml.safe_load_all(manifest) if d)


def test_the_server_takes_the_default_install_and_notes_say_what_next(
    crds: controlplane.ControlPlane, namespace: str
) -> None:
    proc = _install(crds, namespace, "--set", CIDRS)
    assert proc.returncode == 0, proc.stderr
    assert "STATUS: pending-install" in proc.stdout
    kinds = _manifest_kinds(proc.stdout)
    assert kinds.count("DaemonSet") == 1 and "Deployment" in kinds and "ConfigMap" in kinds
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {namespace} rollout status ds/podwire-agent" in notes
    assert "kubectl get wgnodes" in notes and "podwire status" in notes
    assert "dropped, never sent in clear" in notes
    assert "ds/podwire-engine" not in notes  # auto: no engine DaemonSet


def test_the_server_takes_every_option_changed(
    crds: controlplane.ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(EVERY_OPTION_CHANGED))
    # The dashboard's namespace must exist for the server to take it: the test's own.
    proc = _install(
        crds, namespace, "-f", str(values), "--set", f"metrics.dashboard.namespace={namespace}"
    )
    assert proc.returncode == 0, proc.stderr
    kinds = _manifest_kinds(proc.stdout)
    assert kinds.count("DaemonSet") == 2  # the agent's and the engine's
    # This apiserver has no monitoring.coreos.com/v1: no ServiceMonitor, and the notes say so.
    assert "ServiceMonitor" not in kinds
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "no monitoring.coreos.com/v1 API" in notes
    assert "rollout status ds/podwire-engine" in notes and "engine_absent" in notes
    assert "NOT dropped (agent.failClosed=false)" in notes


def test_the_schema_stops_a_wrong_value_before_the_server(
    crds: controlplane.ControlPlane, namespace: str
) -> None:
    proc = _install(crds, namespace, "--set", CIDRS, "--set", "agent.listenPort=-5")
    assert proc.returncode != 0
    assert "at '/agent/listenPort': minimum: got -5, want 1" in proc.stderr
