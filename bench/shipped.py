"""The engine as the image ships it, for the benchmarks to measure.

The image (Dockerfile) runs podwire-engine on Debian bookworm's python3: built with PGO and
LTO, libpython linked into the executable. The development environment (.venv) is made by
whichever python3 comes first on PATH; on this machine that is pyenv's 3.11.7, built without
either and with libpython as a shared library, and the engine's per-packet Python runs
measurably slower on it (an idle round trip of 0.40 ms against 0.32 ms on Debian's, in the
same interleaved run; see the README). A benchmark of the engine measures what users run: the
engine installed from this working tree into an environment of Debian's interpreter. The
development environment's engine stays a case of its own in bench/throughput.py, so the
difference is on record.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib

from podwire.sandbox import tools

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Debian's interpreter: the image's base is Debian bookworm, and so is this machine.
DEBIAN_PYTHON = pathlib.Path("/usr/bin/python3")
VENV = ROOT / ".cache" / "bench" / "engine-venv"
DEV_ENGINE = str(pathlib.Path(sys.executable).parent / "podwire-engine")


def engine() -> str:
    """The path of podwire-engine from this working tree under Debian's python3, installed
    afresh (a wheel built from the tree as it is, uncommitted changes included, its native
    fast path compiled for that interpreter) so that it runs the code being measured.
    Raises ToolMissing without Debian's python3, RuntimeError when the install fails."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        raise tools.ToolMissing(
            f"{DEBIAN_PYTHON} is missing: apt-get install python3-venv python3-dev "
            "(hack/setup.sh does)"
        )
    python = VENV / "bin" / "python"
    try:
        if not python.exists() or _version(python) != _version(DEBIAN_PYTHON):
            VENV.parent.mkdir(parents=True, exist_ok=True)
            _run(str(DEBIAN_PYTHON), "-m", "venv", "--clear", str(VENV))
        dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run(*pip, *dependencies)
        # Built from a copy of the tree's sources: setuptools' build/ in the tree would keep
        # (and install) a module since deleted from it.
        with tempfile.TemporaryDirectory(prefix="podwire-shipped-") as tmp:
            source = pathlib.Path(tmp) / "podwire"
            skip = shutil.ignore_patterns(
                ".*", "build", "*.egg-info", "__pycache__", "*.so", "tests", "bench"
            )
            shutil.copytree(ROOT, source, ignore=skip)
            _run(*pip, "--no-deps", "--force-reinstall", str(source))
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or [str(exc)]
        raise RuntimeError(
            f"installing the engine under {DEBIAN_PYTHON} failed: {why[0]}"
        ) from None
    return str(VENV / "bin" / "podwire-engine")


def _run(*argv: str) -> str:
    # From / : the tree's top-level `operator` package would shadow the standard library's.
    return subprocess.run(argv, cwd="/", check=True, capture_output=True, text=True).stdout


def _version(python: pathlib.Path) -> str:
    return _run(str(python), "-c", "import sys; print(sys.version)").strip()


def versions() -> dict[str, str]:
    """Which interpreter each engine case ran on, for the record."""
    shipped = VENV / "bin" / "python"
    return {
        "shipped": _version(shipped) if shipped.exists() else "not installed",
        "dev venv": sys.version,
    }
