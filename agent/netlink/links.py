"""The agent's own link: whether it is there (and still the same one), its MTU, state, address.

The WireGuard link, kernel or userspace (a TUN), is set up the same way once it exists; these
are the calls that do it, and that the device watchdog uses to see the link is still there.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress

from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError

from podwire.agent.netlink import core


def link_exists(device: str, *, netns: str | None = None) -> bool:
    with core.errors(f"find link {device}"), core.iproute(netns) as ipr:
        return bool(ipr.link_lookup(ifname=device))


def link_index(device: str, *, netns: str | None = None) -> int | None:
    """The link's ifindex, or None when there is no such link."""
    with core.errors(f"find link {device}"), core.iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        return int(found[0]) if found else None


def link_mtu(device: str, *, netns: str | None = None) -> int:
    with core.errors(f"read link {device}"), core.iproute(netns) as ipr:
        return int(ipr.link("get", index=core.index(ipr, device))[0].get_attr("IFLA_MTU"))


def set_mtu(device: str, mtu: int, *, netns: str | None = None) -> None:
    with core.errors(f"set MTU {mtu} on {device}"), core.iproute(netns) as ipr:
        ipr.link("set", index=core.index(ipr, device), mtu=mtu)


def set_link_up(device: str, *, netns: str | None = None) -> None:
    with core.errors(f"set {device} up"), core.iproute(netns) as ipr:
        ipr.link("set", index=core.index(ipr, device), state="up")


def add_address(device: str, cidr: str, *, netns: str | None = None) -> None:
    """Adds the interface address cidr (e.g. 10.244.1.0/32); present already is fine."""
    iface = ipaddress.ip_interface(cidr)
    with core.errors(f"add address {cidr} to {device}"), core.iproute(netns) as ipr:
        try:
            ipr.addr(
                "add",
                index=core.index(ipr, device),
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        except PrNetlinkError as exc:
            if exc.code != errno_mod.EEXIST:
                raise


def delete_link(device: str, *, netns: str | None = None) -> None:
    """Deletes the link; a link that is already gone is fine."""
    with core.errors(f"delete link {device}"), core.iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if found:
            ipr.link("del", index=found[0])
