"""The code's own checks, run as tests so the suite fails when one does: ruff (lint and
format), mypy on the packages, and the import-linter contracts that keep the layers apart."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
PACKAGES = ["agent", "operator", "proto", "sandbox"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint() -> None:
    proc = _run(str(BIN / "ruff"), "check", *PACKAGES, "tests", "bench", "hack")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = _run(str(BIN / "ruff"), "format", "--check", *PACKAGES, "tests", "bench", "hack")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = _run(str(ROOT / "hack" / "mypy.sh"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_contracts() -> None:
    proc = _run(str(BIN / "lint-imports"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: " in proc.stdout and " broken" in proc.stdout
