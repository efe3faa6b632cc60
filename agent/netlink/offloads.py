"""The kernel's performance features on the device: GRO and BIG TCP sizes, and what was applied.

WireGuard's throughput on a modern kernel rests on moving large segments: GRO coalesces what
the device receives, BIG TCP lets segments grow past 64 KiB, and UDP GRO forwarding on the
underlay (in `ethtool`) coalesces the encrypted packets. Each is applied where the kernel has
it and reported where it does not, so that the agent's status can say what is in force.

The sizes are set over rtnetlink; pyroute2 0.9 lacks the IPv4 BIG TCP attributes (Linux 6.3),
so a link message of our own carries them.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from podwire.agent.netlink import core, ethtool

# BIG TCP: 192 KiB segments, as the kernel's own selftests and Cilium use.
BIG_TCP_SIZE: Final = 196608
# The kernel's sizes before BIG TCP (GSO_LEGACY_MAX_SIZE).
LEGACY_SIZE: Final = 65536
_GRO_ATTRS: Final = ("gro_max_size",)
_BIG_TCP_ATTRS: Final = ("gso_max_size", "gso_ipv4_max_size", "gro_ipv4_max_size")
_SIZE_ATTRS: Final = {
    "gso_max_size": "IFLA_GSO_MAX_SIZE",
    "gro_max_size": "IFLA_GRO_MAX_SIZE",
    "tso_max_size": "IFLA_TSO_MAX_SIZE",
    "gso_ipv4_max_size": "IFLA_GSO_IPV4_MAX_SIZE",
    "gro_ipv4_max_size": "IFLA_GRO_IPV4_MAX_SIZE",
}


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureReport:
    """What apply_features found: applied names, and for the others why not."""

    applied: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (feature, reason)


def apply_features(
    device: str,
    *,
    underlay_device: str | None = None,
    gro: bool = True,
    big_tcp: bool = True,
    udp_gro_forwarding: bool = True,
    netns: str | None = None,
) -> FeatureReport:
    """Applies each wanted feature where the kernel supports it, and says what it did.

    Never raises for a feature the kernel lacks: a missing offload costs speed, not traffic.
    A feature turned off is taken back to the kernel's default on the device, which podwire
    owns (an agent restarted with new config finds the old sizes there); the underlay is the
    node's, and podwire never turns its UDP GRO forwarding off.
    """
    applied: list[str] = []
    skipped: list[tuple[str, str]] = []
    sizes = offload_sizes(device, netns=netns)
    wanted = [("gro", gro, _GRO_ATTRS), ("big_tcp", big_tcp, _BIG_TCP_ATTRS)]
    for name, on, attrs in wanted:
        missing = [a for a in attrs if a not in sizes]
        if not on:
            if not missing and any(sizes[a] > LEGACY_SIZE for a in attrs):
                _set_offload_sizes(device, dict.fromkeys(attrs, LEGACY_SIZE), netns=netns)
            skipped.append((name, "turned off"))
            continue
        if missing:
            skipped.append((name, f"the kernel has no {', '.join(missing)}"))
            continue
        # What the device sends is bounded by what it can segment; what it receives is not.
        limit = sizes.get("tso_max_size", BIG_TCP_SIZE)
        if any(a.startswith("gso_") for a in attrs) and limit <= LEGACY_SIZE:
            skipped.append((name, f"{device} takes no segment above 64 KiB (tso_max_size {limit})"))
            continue
        try:
            _set_offload_sizes(device, dict.fromkeys(attrs, BIG_TCP_SIZE), netns=netns)
            applied.append(name)
        except core.NetlinkError as exc:
            skipped.append((name, str(exc)))
    if not udp_gro_forwarding:
        skipped.append(("udp_gro_forwarding", "turned off"))
    elif underlay_device is None:
        skipped.append(("udp_gro_forwarding", "no underlay device"))
    else:
        reason = ethtool.enable_udp_gro_forwarding(underlay_device, netns=netns)
        if reason:
            skipped.append(("udp_gro_forwarding", reason))
        else:
            applied.append("udp_gro_forwarding")
    return FeatureReport(tuple(applied), tuple(skipped))


def offload_sizes(device: str, *, netns: str | None = None) -> dict[str, int]:
    """The device's GSO/GRO/TSO size limits, by iproute2's names; a size the kernel lacks is absent."""
    with core.errors(f"read the offload sizes of {device}"), core.iproute(netns) as ipr:
        ipr.marshal.msg_map[RTM_NEWLINK] = _ifinfmsg
        link = ipr.link("get", index=core.index(ipr, device))[0]
        found = {name: link.get_attr(nla) for name, nla in _SIZE_ATTRS.items()}
    return {name: int(value) for name, value in found.items() if value is not None}


# pyroute2 is untyped, so mypy's strict mode sees ifinfmsg as Any; unused-ignore: its default
# mode does not complain about subclassing Any.
class _ifinfmsg(ifinfmsg):  # type: ignore[misc,unused-ignore]
    """A link message that also knows IPv4 BIG TCP's sizes (Linux 6.3), which pyroute2 0.9 lacks."""

    # Compile this class's own attribute table instead of inheriting ifinfmsg's.
    _nlmsg_base__compiled_nla = False
    nla_map = (
        *ifinfmsg.nla_map,
        ("IFLA_DEVLINK_PORT", "hex"),  # 62
        ("IFLA_GSO_IPV4_MAX_SIZE", "uint32"),  # 63
        ("IFLA_GRO_IPV4_MAX_SIZE", "uint32"),  # 64
    )


def _set_offload_sizes(device: str, sizes: dict[str, int], *, netns: str | None = None) -> None:
    what = ", ".join(f"{name} {size}" for name, size in sizes.items())
    with core.errors(f"set {what} on {device}"), core.iproute(netns) as ipr:
        msg = _ifinfmsg()
        msg["index"] = core.index(ipr, device)
        msg["attrs"] = [(_SIZE_ATTRS[name], size) for name, size in sizes.items()]
        msg["header"]["type"] = RTM_NEWLINK
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        # nlm_request_batch: IPRoute.nlm_request of pyroute2 0.9.7 fails on its own status.
        ipr.nlm_request_batch([msg])
