"""The source folders are installed into the podwire.* namespace, and nowhere else."""

from __future__ import annotations

import importlib
import operator
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_operator_folder_never_shadows_the_standard_library() -> None:
    assert pathlib.Path(operator.__file__).parent != ROOT / "operator"
    assert hasattr(operator, "itemgetter")
    pkg = importlib.import_module("podwire.operator")
    assert pathlib.Path(pkg.__file__).parent == ROOT / "operator"  # type: ignore[arg-type]


def test_console_scripts_are_installed() -> None:
    bindir = pathlib.Path(sys.executable).parent
    for script in ("podwire", "podwire-agent", "podwire-operator", "podwire-engine"):
        assert (bindir / script).exists(), f"{script} is not installed in {bindir}"


def test_cli_answers_help() -> None:
    proc = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "podwire"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sandbox" in proc.stdout
