"""helm, built from the Go module proxy, runs and accepts podwire's chart."""

from __future__ import annotations

import pathlib
import subprocess

from podwire.sandbox import tools

CHART = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "helm" / "podwire"


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.path("helm"), *args], capture_output=True, text=True, timeout=120)


def test_helm_version_is_the_pinned_build() -> None:
    proc = _helm("version", "--short")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout


def test_chart_lints_and_renders(tmp_path: pathlib.Path) -> None:
    lint = _helm("lint", "--strict", str(CHART), "--set", "agent.clusterPodCIDRs=10.244.0.0/16")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout

    rendered = _helm(
        "template", "podwire", str(CHART), "--include-crds",
        "--set", "agent.clusterPodCIDRs=10.244.0.0/16",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: CustomResourceDefinition" in rendered.stdout or not list(
        (CHART / "crds").glob("*.yaml")
    )


def test_lint_rejects_a_broken_chart(tmp_path: pathlib.Path) -> None:
    # The check above means something only if helm lint does fail on a bad chart.
    broken = tmp_path / "broken"
    (broken / "templates").mkdir(parents=True)
    (broken / "Chart.yaml").write_text("apiVersion: v2\nname: broken\n")  # no version
    (broken / "templates" / "x.yaml").write_text("kind: {{ .Values.missing.field }}\n")
    assert _helm("lint", "--strict", str(broken)).returncode != 0


def _template(*sets: str) -> str:
    args = ["template", "podwire", str(CHART), "--set", "agent.clusterPodCIDRs=10.244.0.0/16"]
    for s in sets:
        args += ["--set", s]
    proc = _helm(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_agent_may_not_escalate_and_runs_under_the_default_seccomp_filter() -> None:
    out = _template()
    assert "allowPrivilegeEscalation: false" in out
    assert "type: RuntimeDefault" in out
    assert "/lib/modules" not in out  # the kernel loads WireGuard's module itself
    assert "/dev/net/tun" in out
    assert "hostPath: {path: /dev/net/tun" not in _template("agent.datapath=kernel")


def test_the_own_wireguardnode_policy_is_on_by_default_and_can_be_turned_off() -> None:
    on = _template()
    assert (
        "kind: ValidatingAdmissionPolicy\n" in on and "kind: ValidatingAdmissionPolicyBinding" in on
    )
    assert "system:serviceaccount:default:podwire-agent" in on
    assert "validationActions:\n    - Deny" in on
    warn = _template("ownWgnodePolicy.validationActions={Warn,Audit}")
    assert "validationActions:\n    - Warn\n    - Audit" in warn
    assert "ValidatingAdmissionPolicy" not in _template("ownWgnodePolicy.enabled=false")


def test_events_are_granted_only_in_the_namespace_the_agent_writes_them() -> None:
    docs = _template().split("\n---\n")
    clusterrole = next(d for d in docs if "kind: ClusterRole\n" in d)
    assert "events" not in clusterrole
    role = next(d for d in docs if "kind: Role\n" in d)
    assert "namespace: default" in role and "resources: [events]" in role
