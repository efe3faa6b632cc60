"""Finds the real components the sandbox and tests run: built ones first, then the system's.

hack/tools/build.sh builds kube-apiserver, kubectl, etcd, helm and upstream wireguard-go into
.cache/tools/bin; Debian's packages provide wg, iperf3, tcpdump and Debian's wireguard-go.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILT = pathlib.Path(os.environ.get("PODWIRE_TOOLS_BIN", REPO / ".cache" / "tools" / "bin"))

# Debian's wireguard-go (0.0.20220316, no offloads) is a baseline of its own, kept apart from
# the upstream build of the same name.
DEBIAN_WIREGUARD_GO = pathlib.Path("/usr/bin/wireguard-go")


class ToolMissing(RuntimeError):
    """A component is not installed; the message says how to install it."""


def path(name: str) -> str:
    """The path of the named tool: our build if there is one, else the one on PATH."""
    built = BUILT / name
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(f"{name} is not installed: run `hack/setup.sh` (or `make test`) to build it")


def debian_wireguard_go() -> str:
    if not os.access(DEBIAN_WIREGUARD_GO, os.X_OK):
        raise ToolMissing("Debian's wireguard-go is missing: apt-get install wireguard-go")
    return str(DEBIAN_WIREGUARD_GO)


def wg_keypair() -> tuple[str, str]:
    """A private and public key as `wg genkey | wg pubkey` makes them (base64)."""
    wg = path("wg")
    private = subprocess.run(
        [wg, "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    public = subprocess.run(
        [wg, "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def write_private_key(path: pathlib.Path, key: str) -> pathlib.Path:
    """A base64 private key in path for `wg set ... private-key`: 0600 from its first byte and
    whole or not at all (a temporary file renamed over), whatever the umask."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing temporary file keeps its mode through O_CREAT
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def private_key_file(path: pathlib.Path, key: str) -> Iterator[pathlib.Path]:
    """write_private_key, removed when the block ends (a benchmark's throwaway keys, read by
    the tunnel once and not left behind in its work folder)."""
    try:
        yield write_private_key(path, key)
    finally:
        path.unlink(missing_ok=True)
