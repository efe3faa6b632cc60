#!/usr/bin/env bash
# Puts a kernel with WireGuard and BIG TCP on WireGuard devices (>= 6.13: the device takes
# segments above 64 KiB) into .cache/kernel for the kernel test tier, without installing a
# kernel on this machine: Debian's packages are downloaded with apt through a private
# configuration (the machine's own sources stay untouched) and unpacked with dpkg-deb.
#
#   .cache/kernel/root/usr/lib/modules/<version>/vmlinuz   the kernel, its modules beside it
#   .cache/kernel/iproute2/bin/ip                          an `ip` that prints the IPv4 BIG TCP
#                                                          sizes, to read them back independently
#   .cache/kernel/version                                  what is there; its presence means done
#
# The guest loads its first modules with busybox's insmod, which takes no compressed module,
# so the modules are decompressed; drivers for hardware the VM has not are dropped.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache="$root/.cache/kernel"
log() { printf '[kernel] %s\n' "$*" >&2; }

# trixie-backports carries Debian's newest stable kernel; bookworm-backports an iproute2 built
# against this machine's libraries.
KERNEL_SUITE=${PODWIRE_KERNEL_SUITE:-trixie-backports}
IPROUTE_SUITE=${PODWIRE_IPROUTE_SUITE:-bookworm-backports}
MIRROR=${PODWIRE_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ -f "$cache/version" ]] && compgen -G "$cache/root/usr/lib/modules/*/vmlinuz" >/dev/null &&
  [[ -x "$cache/iproute2/bin/ip" ]]; then
  exit 0
fi

rm -rf "$cache"
mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/debs"
cat >"$cache/apt/sources.list" <<EOF
deb $MIRROR $KERNEL_SUITE main
deb $MIRROR $IPROUTE_SUITE main
EOF
apt_opts=(
  -o "Dir::Etc::SourceList=$cache/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
log "reading $KERNEL_SUITE and $IPROUTE_SUITE"
apt-get "${apt_opts[@]}" update -qq

# linux-image-amd64 -> linux-image-<abi>-amd64, which is the kernel itself or (since 6.17)
# depends on linux-binary-, linux-modules- and linux-base-<abi>-amd64.
image=$(apt-cache "${apt_opts[@]}" depends "linux-image-amd64/$KERNEL_SUITE" |
  awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n "$image" ]] || { log "no linux-image-amd64 in $KERNEL_SUITE"; exit 1; }
abi=${image#linux-image-}
parts=("$image")
for dep in $(apt-cache "${apt_opts[@]}" depends "$image/$KERNEL_SUITE" |
  awk '/Depends: linux-(binary|modules|base)-/ {print $2}'); do
  parts+=("$dep")
done
log "downloading ${parts[*]}"
(cd "$cache/debs" && apt-get "${apt_opts[@]}" download -qq "${parts[@]/%//$KERNEL_SUITE}" "iproute2/$IPROUTE_SUITE")

for deb in "$cache"/debs/linux-*.deb; do
  dpkg-deb -x "$deb" "$cache/root"
done
dpkg-deb -x "$cache"/debs/iproute2_*.deb "$cache/iproute2-pkg"
mkdir -p "$cache/iproute2/bin"
mv "$cache/iproute2-pkg/bin/ip" "$cache/iproute2/bin/ip"

# Older packages put the kernel in /boot and the modules in /lib/modules: move them where the
# newer ones do, so one layout serves both.
moddir="$cache/root/usr/lib/modules/$abi"
if [[ -d "$cache/root/lib/modules/$abi" ]]; then
  mkdir -p "$cache/root/usr/lib/modules"
  mv "$cache/root/lib/modules/$abi" "$moddir"
fi
if [[ -f "$cache/root/boot/vmlinuz-$abi" ]]; then
  mv "$cache/root/boot/vmlinuz-$abi" "$moddir/vmlinuz"
  mv "$cache/root/boot/config-$abi" "$moddir/config" 2>/dev/null || true
fi
[[ -f "$moddir/vmlinuz" ]] || { log "no vmlinuz in ${parts[*]}"; exit 1; }

(cd "$moddir/kernel" && rm -rf sound drivers/{gpu,media,infiniband,staging,usb,hid,iio,input,scsi,bluetooth,isdn} drivers/net/{wireless,ethernet})
find "$moddir/kernel" -name '*.ko.xz' -print0 | xargs -0 -r -n 200 -P "$(nproc)" xz -d
find "$moddir/kernel" -name '*.ko.zst' -print0 | xargs -0 -r -n 200 -P "$(nproc)" zstd -q -d --rm
depmod -a -b "$cache/root/usr" "$abi"
rm -rf "$cache/debs" "$cache/iproute2-pkg" "$cache/apt/cache"

echo "$abi" >"$cache/version"
log "kernel $abi in $moddir ($(du -sh "$cache" | cut -f1) in .cache/kernel)"
