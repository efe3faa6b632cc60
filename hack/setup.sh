#!/usr/bin/env bash
# Installs everything podwire's sandbox and tests need on a fresh Debian machine, and nothing
# twice: Debian packages, a virtual environment with the Python dependencies (.venv), the
# real components built from the Go module proxy (.cache/tools, see hack/tools/build.sh), and
# the kernel the kernel tier boots under QEMU (.cache/kernel, see hack/kernel/fetch.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[setup] %s\n' "$*" >&2; }

# wireguard-go and wireguard-tools come with --no-install-recommends: their recommends pull
# in a kernel module build chain the tests never use.
DEBIAN_PACKAGES=(
  iproute2 iputils-ping procps kmod
  wireguard-tools wireguard-go
  # the engine's native fast path (agent/engine/native), built by `pip install -e .`
  gcc libc6-dev libssl-dev python3-dev
  # the benchmarks run the engine as the image ships it, on Debian's python3 (bench/shipped.py)
  python3-venv
  iperf3 tcpdump ethtool
  # the kernel tier: QEMU, and busybox for virtme-ng's initramfs
  qemu-system-x86 busybox-static xz-utils
  # the image (Dockerfile, built without a daemon by hack/image.sh) and the sandbox's real
  # nodes: runc, not crun (crun refuses this machine's hybrid cgroups); netavark, podman's
  # network backend, only recommended by it
  podman buildah mmdebstrap runc uidmap fuse-overlayfs netavark
  containerd containernetworking-plugins iptables conntrack
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtual environment is rebuilt when pyproject.toml changes.
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || "$(cat .venv/.stamp 2>/dev/null)" != "$want" ]]; then
  log "creating .venv with podwire and its test dependencies"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > .venv/.stamp
fi
# The engine's native fast path (an optional C extension, built in place by an editable
# install) is rebuilt when its source changes; a failed build leaves the pure-Python path.
native=$(cat agent/engine/native/*.c | sha256sum | cut -d' ' -f1)
if [[ "$(cat .venv/.native-stamp 2>/dev/null)" != "$native" ]]; then
  log "building the engine's native fast path"
  .venv/bin/pip install -q --no-deps -e .
  echo "$native" > .venv/.native-stamp
fi

hack/tools/build.sh
# promtool, which checks the agent's and the operator's /metrics in the chart's tests
hack/tools/promtool.sh
hack/kernel/fetch.sh

# podwire's image (Dockerfile), built by podman without a daemon or a registry, and again only
# when the sources that go into it change (see hack/image.sh); the real nodes import its archive.
hack/image.sh
