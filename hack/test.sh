#!/usr/bin/env bash
# Runs every test this machine can run: unit (no root), integration (network namespaces, TUN,
# the real kube-apiserver, helm), e2e (the sandbox) and kernel (QEMU). Static checks (ruff,
# mypy, import-linter) run as unit tests, so the output ends with pytest's summary line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Not `python -m pytest`: that would put the repo root on sys.path, where the folder
# `operator/` would shadow the standard library's module.
exec .venv/bin/pytest -p no:cacheprovider "$@" tests
