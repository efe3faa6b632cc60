"""The node's kernel settings that cost WireGuard throughput, each as advice to the operator.

The LPC 2024 talk on WireGuard and GRO (../shared/reference/lpc2024-wireguard-gro-talk.txt)
measured a large cost from page clearing with `init_on_alloc=1` (skb_cow_data allocates on
every packet WireGuard encrypts), and gains from UDP GRO forwarding on the underlay and from
BIG TCP; Calico turns threaded NAPI on for its WireGuard device. A node that lacks one of these
still carries traffic, only slower, so the agent says so instead of failing: each finding is an
`Advisory` that names the setting and says what to change and why.

Pure: the caller reads the kernel (agent/netlink/kernelinfo.py) and hands over what it read;
a value the caller could not read is None, and an unknown value never yields an advisory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final

INIT_ON_ALLOC: Final = "init_on_alloc"
UDP_GRO_FORWARDING: Final = "udp_gro_forwarding"
BIG_TCP: Final = "big_tcp"
GRO_LIMITS: Final = "gro_limits"
THREADED_NAPI: Final = "threaded_napi"
NAMES: Final = (INIT_ON_ALLOC, UDP_GRO_FORWARDING, BIG_TCP, GRO_LIMITS, THREADED_NAPI)

# The segment size podwire sets where the kernel accepts it (offloads.BIG_TCP_SIZE), and the
# kernel's size before BIG TCP: a limit below the first that the kernel would raise is advice.
TARGET_SIZE: Final = 196608
LEGACY_SIZE: Final = 65536
_BIG_TCP_SIZES: Final = ("gso_max_size", "gso_ipv4_max_size", "gro_ipv4_max_size")
_CMDLINE_RE: Final = re.compile(r"(?:^|\s)init_on_alloc=(\S*)")
_CONFIG_RE: Final = re.compile(r"^CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\s*$", re.MULTILINE)
_TRUE_WORDS: Final = ("1", "y", "yes", "on", "true")
_FALSE_WORDS: Final = ("0", "n", "no", "off", "false")


@dataclasses.dataclass(frozen=True, slots=True)
class Advisory:
    """A setting that costs throughput: its name (one of NAMES) and what to change and why."""

    name: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Facts:
    """What the agent read on its node; None where it could not tell."""

    datapath: str = ""  # kernel, userspace, or "" before the device is up
    device: str = ""
    features: tuple[str, ...] = ()  # what the datapath applied (Backend.features())
    cmdline: str | None = None  # /proc/cmdline
    kernel_config: str | None = None  # the kernel's build configuration, as text
    underlay_device: str | None = None
    udp_gro_forwarding: bool | None = None  # None: the underlay does not offer it, or unknown
    sizes: Mapping[str, int] | None = None  # the device's offload sizes (offloads.offload_sizes)
    threaded_napi: bool | None = None  # None: the kernel has no threaded NAPI for the device


def init_on_alloc(cmdline: str | None, kernel_config: str | None) -> bool | None:
    """Whether the kernel zeroes every allocation: the command line's word, else the build's
    default; None when neither says (a kernel configuration that cannot be found)."""
    if cmdline is not None:
        words = _CMDLINE_RE.findall(cmdline)
        if words:  # the kernel takes the last one (kstrtobool)
            word = words[-1].lower()
            if word.startswith(_TRUE_WORDS):
                return True
            if word.startswith(_FALSE_WORDS):
                return False
    if kernel_config is None:
        return None
    return bool(_CONFIG_RE.search(kernel_config))


def find(facts: Facts) -> tuple[Advisory, ...]:
    """Every advisory for the node, in the order of NAMES."""
    found = (
        _init_on_alloc(facts),
        _udp_gro_forwarding(facts),
        _big_tcp(facts),
        _gro_limits(facts),
        _threaded_napi(facts),
    )
    return tuple(a for a in found if a is not None)


def _init_on_alloc(facts: Facts) -> Advisory | None:
    if not init_on_alloc(facts.cmdline, facts.kernel_config):
        return None
    return Advisory(
        INIT_ON_ALLOC,
        "init_on_alloc=1 zeroes every page the kernel allocates, which the LPC 2024 talk"
        " measured as a large cost for WireGuard (skb_cow_data on every packet); boot with"
        " init_on_alloc=0 if your security policy allows",
    )


def _udp_gro_forwarding(facts: Facts) -> Advisory | None:
    if facts.udp_gro_forwarding is not False or UDP_GRO_FORWARDING in facts.features:
        return None
    return Advisory(
        UDP_GRO_FORWARDING,
        f"UDP GRO forwarding is off on the underlay {facts.underlay_device}, so every encrypted"
        " packet crosses the stack alone; turn podwire's udp_gro_forwarding feature on (or"
        f" `ethtool -K {facts.underlay_device} rx-udp-gro-forwarding on`)",
    )


def _big_tcp(facts: Facts) -> Advisory | None:
    sizes = facts.sizes
    if facts.datapath != "kernel" or sizes is None or BIG_TCP in facts.features:
        return None
    missing = [name for name in _BIG_TCP_SIZES if name not in sizes]
    if missing:
        why = f"this kernel has no {', '.join(missing)} (BIG TCP for IPv4 needs Linux 6.3)"
    elif sizes.get("tso_max_size", TARGET_SIZE) <= LEGACY_SIZE:
        why = (
            f"{facts.device} takes no segment above 64 KiB (tso_max_size"
            f" {sizes['tso_max_size']}; WireGuard devices take more from Linux 6.13)"
        )
    else:
        return None  # available and turned off: the limits advisory says so
    return Advisory(
        BIG_TCP,
        f"BIG TCP is unavailable: {why}; a newer kernel lets WireGuard move segments"
        " above 64 KiB, which the talk measured as a throughput gain",
    )


def _gro_limits(facts: Facts) -> Advisory | None:
    sizes = facts.sizes
    if facts.datapath != "kernel" or sizes is None:
        return None
    low = [
        f"{name} {sizes[name]}"
        for name, allowed in _allowed(sizes).items()
        if name in sizes and sizes[name] < allowed
    ]
    if not low:
        return None
    return Advisory(
        GRO_LIMITS,
        f"{', '.join(low)} on {facts.device} is below the {TARGET_SIZE} the kernel accepts,"
        " so GRO and GSO stop at 64 KiB; turn podwire's gro and big_tcp features on",
    )


def _allowed(sizes: Mapping[str, int]) -> dict[str, int]:
    """What each size could be on this device: GRO has no device bound; what the device sends
    is bounded by what it can segment (tso_max_size), and needs BIG TCP's attributes."""
    allowed = {"gro_max_size": TARGET_SIZE}
    if all(name in sizes for name in _BIG_TCP_SIZES):
        send = min(sizes.get("tso_max_size", TARGET_SIZE), TARGET_SIZE)
        if send > LEGACY_SIZE:
            allowed.update(dict.fromkeys(_BIG_TCP_SIZES, send))
            allowed["gro_ipv4_max_size"] = TARGET_SIZE
    return allowed


def _threaded_napi(facts: Facts) -> Advisory | None:
    if (
        facts.datapath != "kernel"
        or facts.threaded_napi is not False
        or THREADED_NAPI in facts.features
    ):
        return None
    return Advisory(
        THREADED_NAPI,
        f"threaded NAPI is off on {facts.device}, so WireGuard's receive work runs in softirq"
        " on the core the packet arrived on; turn podwire's threaded_napi feature on (as"
        f" Calico does) or write 1 to /sys/class/net/{facts.device}/threaded",
    )
