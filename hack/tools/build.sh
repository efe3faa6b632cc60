#!/usr/bin/env bash
# Builds the real components of the test bed from the Go module proxy, pinned, into
# .cache/tools/bin. Each tool is rebuilt only when its pin changes (a stamp file records it),
# so a second run is fast. Usage: hack/tools/build.sh [tool ...]   (default: all)
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache="$root/.cache/tools"
bin="$cache/bin"
mkdir -p "$bin" "$cache/stamps" "$cache/logs"

# Pins. Kubernetes' staging modules are published as v0.<minor>.<patch>.
KUBE_VERSION=v1.34.4
ETCD_VERSION=v3.5.21
HELM_VERSION=v3.19.0
# wireguard-go has no semver tags; this pseudo-version is upstream master of 2026-05-22,
# newer than the 0.0.20250515 release that brought TUN TSO/GRO and UDP GSO/GRO.
WIREGUARD_GO_VERSION=v0.0.0-20260522210424-ecfc5a8d5446

export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

log() { printf '[tools] %s\n' "$*" >&2; }

fresh() { # fresh NAME PIN: true when NAME was built at PIN and the binaries exist
  local name=$1 pin=$2; shift 2
  [[ -f "$cache/stamps/$name" && "$(cat "$cache/stamps/$name")" == "$pin" ]] || return 1
  local b; for b in "$@"; do [[ -x "$bin/$b" ]] || return 1; done
}

stamp() { echo "$2" >"$cache/stamps/$1"; }

timed() { # timed NAME CMD...: runs CMD, logging to logs/NAME.log, reporting the duration
  local name=$1; shift
  local t0=$SECONDS
  if ! "$@" >"$cache/logs/$name.log" 2>&1; then
    log "building $name failed; the last lines of $cache/logs/$name.log:"
    tail -n 30 "$cache/logs/$name.log" >&2
    return 1
  fi
  log "$name built in $((SECONDS - t0))s"
}

# A wrapper module of our own requires the upstream module and builds its main package;
# the upstream go.mod's replace directives are then ignored, as `go install` would refuse them.
wrapper() { # wrapper DIR MODULE VERSION
  local dir=$1 mod=$2 ver=$3
  mkdir -p "$dir"
  if [[ ! -f "$dir/go.mod" ]]; then
    (cd "$dir" && go mod init podwire.local/tools/"$(basename "$dir")" >/dev/null 2>&1)
  fi
  (cd "$dir" && go mod edit -require="$mod@$ver")
}

build_etcd() {
  fresh etcd "$ETCD_VERSION" etcd && return 0
  local dir="$root/hack/tools/etcd"
  wrapper "$dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  timed etcd bash -c "cd '$dir' && go build -trimpath -o '$bin/etcd' go.etcd.io/etcd/server/v3"
  stamp etcd "$ETCD_VERSION"
}

build_kube() {
  fresh kube "$KUBE_VERSION" kube-apiserver kubectl && return 0
  local dir="$root/hack/tools/kube" staging=v0.${KUBE_VERSION#v1.}
  wrapper "$dir" k8s.io/kubernetes "$KUBE_VERSION"
  # k8s.io/kubernetes replaces its staging modules with local paths; point each one at its
  # published version instead. The list is read from the pinned go.mod itself.
  local gomod
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  local m
  for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    (cd "$dir" && go mod edit -replace="$m=$m@$staging")
  done
  timed kube bash -c "cd '$dir' && go build -trimpath -o '$bin/' k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl"
  stamp kube "$KUBE_VERSION"
}

# The node components (kubelet, controller manager, scheduler) of the sandbox's kubelet runtime,
# from the same wrapper module and pin as kube-apiserver. The version is stamped in with ldflags,
# else Nodes report v0.0.0-master.
build_kubenode() {
  fresh kubenode "$KUBE_VERSION" kubelet kube-controller-manager kube-scheduler && return 0
  build_kube
  local dir="$root/hack/tools/kube"
  local ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "${KUBE_VERSION#v1.}" | cut -d. -f1)"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  timed kubenode bash -c "cd '$dir' && go build -trimpath -ldflags '$ldflags' -o '$bin/' \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler"
  stamp kubenode "$KUBE_VERSION"
}

# The pod sandbox ("pause") image for containerd, made here with no registry: a static Go
# pause binary of our own (hack/tools/pause) in a one-layer image written as a docker-archive,
# which `ctr images import` reads. The pin is a hash of the source, so an edit rebuilds it.
PAUSE_IMAGE=podwire.local/pause:3.10
build_pause() {
  local dir="$root/hack/tools/pause" out="$cache/pause"
  local pin; pin="$(cat "$dir/main.go" "$dir/go.mod" | sha256sum | cut -c1-16) $PAUSE_IMAGE"
  fresh pause "$pin" pause && [[ -f "$out/pause.tar" ]] && return 0
  timed pause bash -c "cd '$dir' && go build -trimpath -ldflags '-s -w' -o '$bin/pause' ."
  rm -rf "$out" && mkdir -p "$out/rootfs" "$out/archive"
  install -m 0755 "$bin/pause" "$out/rootfs/pause"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$out/rootfs" \
    -cf "$out/archive/layer.tar" pause
  local diff; diff=$(sha256sum "$out/archive/layer.tar" | cut -d' ' -f1)
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause"]},%s}' \
    "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff\"]}" >"$out/config.json"
  local cfg; cfg=$(sha256sum "$out/config.json" | cut -d' ' -f1)
  mv "$out/config.json" "$out/archive/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$cfg" "$PAUSE_IMAGE" \
    >"$out/archive/manifest.json"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$out/archive" \
    -cf "$out/pause.tar" .
  echo "$PAUSE_IMAGE" >"$out/name"
  stamp pause "$pin"
}

build_helm() {
  fresh helm "$HELM_VERSION" helm && return 0
  local dir="$root/hack/tools/helm"
  wrapper "$dir" helm.sh/helm/v3 "$HELM_VERSION"
  timed helm bash -c "cd '$dir' && go build -trimpath -o '$bin/helm' helm.sh/helm/v3/cmd/helm"
  stamp helm "$HELM_VERSION"
}

build_wireguard_go() {
  fresh wireguard-go "$WIREGUARD_GO_VERSION" wireguard-go && return 0
  local dir="$root/hack/tools/wireguard-go"
  wrapper "$dir" golang.zx2c4.com/wireguard "$WIREGUARD_GO_VERSION"
  timed wireguard-go bash -c "cd '$dir' && go build -trimpath -o '$bin/wireguard-go' golang.zx2c4.com/wireguard"
  stamp wireguard-go "$WIREGUARD_GO_VERSION"
}

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(wireguard-go etcd helm kube kubenode pause)
for t in "${tools[@]}"; do
  case $t in
    etcd) build_etcd ;;
    kube) build_kube ;;
    kubenode) build_kubenode ;;
    pause) build_pause ;;
    helm) build_helm ;;
    wireguard-go) build_wireguard_go ;;
    *) log "unknown tool: $t"; exit 2 ;;
  esac
done
