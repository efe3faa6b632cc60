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
