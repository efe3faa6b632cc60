#!/usr/bin/env bash
# Builds promtool (Prometheus' checker for /metrics text, rules and configs) from the Go module
# proxy, pinned, into .cache/tools/bin, as hack/tools/build.sh builds the other real
# components: rebuilt only when the pin changes (a stamp file records it), so a second run is
# fast. The chart's tests run `promtool check metrics` on a live agent's /metrics.
# Usage: hack/tools/promtool.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache="$root/.cache/tools"
bin="$cache/bin"
mkdir -p "$bin" "$cache/stamps" "$cache/logs"

# Prometheus publishes its Go module as v0.<major><minor>.<patch>: v0.316.0 is Prometheus 3.16.0.
PROMETHEUS_VERSION=v0.316.0

export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

log() { printf '[tools] %s\n' "$*" >&2; }

stamp_file="$cache/stamps/promtool"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$PROMETHEUS_VERSION" && -x "$bin/promtool" ]]; then
  exit 0
fi

# A wrapper module of our own requires the upstream module and builds its main package, as
# build.sh does: the upstream go.mod's replace directives, if any, are then ignored.
dir="$root/hack/tools/promtool"
mkdir -p "$dir"
if [[ ! -f "$dir/go.mod" ]]; then
  (cd "$dir" && go mod init podwire.local/tools/promtool >/dev/null 2>&1)
fi
(cd "$dir" && go mod edit -require="github.com/prometheus/prometheus@$PROMETHEUS_VERSION")

t0=$SECONDS
if ! (cd "$dir" && go build -trimpath -o "$bin/promtool" github.com/prometheus/prometheus/cmd/promtool) \
    >"$cache/logs/promtool.log" 2>&1; then
  log "building promtool failed; the last lines of $cache/logs/promtool.log:"
  tail -n 30 "$cache/logs/promtool.log" >&2
  exit 1
fi
log "promtool built in $((SECONDS - t0))s"
echo "$PROMETHEUS_VERSION" >"$stamp_file"
