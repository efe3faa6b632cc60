#!/usr/bin/env bash
# mypy sees the installed layout (podwire.agent, podwire.operator, podwire.api, podwire.sandbox)
# through a tree of symlinks, since the folders are mapped into the namespace only at install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree="$root/.cache/mypy-tree"
mkdir -p "$tree/podwire"
ln -sfn "$root/agent" "$tree/podwire/agent"
ln -sfn "$root/operator" "$tree/podwire/operator"
ln -sfn "$root/proto" "$tree/podwire/api"
ln -sfn "$root/sandbox" "$tree/podwire/sandbox"
cd "$tree"
exec "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.cache/mypy" -p podwire "$@"
