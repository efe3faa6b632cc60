"""The commands a user runs, given a kubeconfig they cannot use: a clear error, never a
traceback."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

BIN = pathlib.Path(sys.executable).parent


@pytest.fixture
def bad_kubeconfig(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "kubeconfig"
    path.write_text("clusters: [\n")  # cut off mid-write
    return path


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"], **env}
    )


def test_the_cli_says_which_kubeconfig_it_cannot_use(bad_kubeconfig: pathlib.Path) -> None:
    out = _run(
        [
            str(BIN / "podwire"),
            "rotate-key",
            "--node",
            "node2",
            "--kubeconfig",
            str(bad_kubeconfig),
        ],
        {},
    )
    assert out.returncode == 1
    assert f"cannot use {bad_kubeconfig}" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_agent_says_which_kubeconfig_it_cannot_use(
    bad_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    out = _run(
        [str(BIN / "podwire-agent")],
        {
            "NODE_NAME": "node1",
            "KUBECONFIG": str(bad_kubeconfig),
            "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16",
            "PODWIRE_KEY_PATH": str(tmp_path / "keys" / "private.key"),
        },
    )
    assert out.returncode == 1
    assert f"cannot use {bad_kubeconfig}" in out.stderr
    assert "Traceback" not in out.stderr
