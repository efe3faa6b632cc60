#!/usr/bin/env bash
# A shell in the kernel tier's VM, for a developer: the kernel from .cache/kernel (run
# hack/setup.sh first) under QEMU, with this machine's root read-only, as the tests boot it.
# Extra arguments go to vng, e.g. --verbose --exec 'ip link add wg0 type wireguard && wg show'
# (--verbose: with no udev in the guest, a command's output comes back on the console only).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
kernel=$(ls "$root"/.cache/kernel/root/usr/lib/modules/*/vmlinuz 2>/dev/null | tail -1)
[[ -n "$kernel" ]] || { echo "no kernel in .cache/kernel: run hack/setup.sh" >&2; exit 1; }
kvm=--disable-kvm
[[ "${PODWIRE_VM_KVM:-}" == 1 ]] && kvm=
cd "$root"
PATH="$root/.venv/bin:$PATH" exec vng --run "$kernel" $kvm --cpus 2 --memory 1G "$@"
