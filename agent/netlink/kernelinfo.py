"""What the node's kernel says about the settings that cost WireGuard throughput.

The agent advises on them (agent/advisories.py, which is pure); this module only reads: the
kernel's command line, its build configuration (for `init_on_alloc`'s default), and a device's
threaded NAPI switch in sysfs, which it also sets for the agent's own device. Each reader
returns None for what it cannot tell, never raises for it: an unknown value is not advised on.

sysfs shows the devices of the namespace it was mounted in, so a device in another namespace
(the tests' nodes) is read through `ip netns exec`, which mounts a sysfs of that namespace.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import subprocess
from typing import Final

CMDLINE: Final = pathlib.Path("/proc/cmdline")
PROC_CONFIG: Final = pathlib.Path("/proc/config.gz")
BOOT: Final = pathlib.Path("/boot")
_SYS_NET: Final = "/sys/class/net"
_NETNS_TIMEOUT: Final = 10.0


def cmdline(path: pathlib.Path = CMDLINE) -> str | None:
    """The kernel's command line, None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def kernel_config(
    *, release: str | None = None, boot: pathlib.Path = BOOT, proc: pathlib.Path = PROC_CONFIG
) -> tuple[str | None, str]:
    """The running kernel's build configuration and where it came from: /boot/config-<release>
    (distributions), else /proc/config.gz (CONFIG_IKCONFIG_PROC); (None, why) when neither is
    there."""
    release = release or os.uname().release
    path = boot / f"config-{release}"
    try:
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    except OSError:
        pass
    try:
        with gzip.open(proc, "rt", encoding="utf-8", errors="replace") as f:
            return f.read(), str(proc)
    except (OSError, EOFError):
        return None, f"neither {path} nor {proc} exists"


def threaded_napi(device: str, *, netns: str | None = None) -> bool | None:
    """Whether the device's NAPI runs in kernel threads; None when the kernel has no switch
    for it (before Linux 5.12) or the device is not there."""
    text = _read_sys(f"{_SYS_NET}/{device}/threaded", netns)
    if text is None or text.strip() not in ("0", "1"):
        return None
    return text.strip() == "1"


def set_threaded_napi(device: str, *, netns: str | None = None) -> str:
    """Turns threaded NAPI on; returns why not, or "" when it is on.

    A device with no NAPI instance yet (a WireGuard device before its first peer, on kernels
    that do not make it threaded themselves) refuses; its peers' NAPI take the switch once set.
    """
    state = threaded_napi(device, netns=netns)
    if state is None:
        return f"{device} has no threaded NAPI switch ({_SYS_NET}/{device}/threaded)"
    if state:
        return ""
    why = _write_sys(f"{_SYS_NET}/{device}/threaded", "1", netns)
    if why:
        return f"{device} refused threaded NAPI: {why}"
    if not threaded_napi(device, netns=netns):
        return f"{device} reads threaded NAPI off after it was turned on"
    return ""


def _read_sys(path: str, netns: str | None) -> str | None:
    if netns is None:
        try:
            return pathlib.Path(path).read_text(encoding="utf-8")
        except OSError:
            return None
    done = _in_netns(netns, ["cat", path])
    return done.stdout if done is not None and done.returncode == 0 else None


def _write_sys(path: str, value: str, netns: str | None) -> str:
    if netns is None:
        try:
            pathlib.Path(path).write_text(value, encoding="utf-8")
        except OSError as exc:
            return exc.strerror or str(exc)
        return ""
    done = _in_netns(netns, ["sh", "-c", f'echo {value} > "$0"', path])
    if done is None:
        return f"`ip netns exec {netns}` could not run"
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _in_netns(netns: str, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=_NETNS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
