"""The underlay: the link the node's traffic, and so its WireGuard packets, leave by.

Its MTU minus WireGuard's overhead is the tunnel's MTU (the overhead is larger over IPv6), and
it is where UDP GRO forwarding is switched on. It is found from the node's address when the
agent knows it, else from the default route.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import ipaddress
import socket
from typing import Any

from podwire.agent.netlink import core


@dataclasses.dataclass(frozen=True, slots=True)
class Underlay:
    """The link the node's traffic leaves by, whose MTU bounds the tunnel's."""

    device: str
    mtu: int
    ipv6: bool  # reached over IPv6 (WireGuard's overhead is 20 bytes more)


def find(*, address: str | None = None, netns: str | None = None) -> Underlay:
    """The underlay: the link holding `address` (or routing to it), else the default route's."""
    with core.errors("find the underlay"), core.iproute(netns) as ipr:
        index, ipv6 = _underlay_index(ipr, address)
        link = ipr.link("get", index=index)[0]
        return Underlay(str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU")), ipv6)


def _underlay_index(ipr: Any, address: str | None) -> tuple[int, bool]:
    if address is not None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        for msg in ipr.get_addr(family=family):
            if msg.get_attr("IFA_ADDRESS") == str(ip) or msg.get_attr("IFA_LOCAL") == str(ip):
                return int(msg["index"]), ip.version == 6
        routes = ipr.route("get", dst=str(ip))
        return int(routes[0].get_attr("RTA_OIF")), ip.version == 6
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            if route["dst_len"] == 0 and route.get_attr("RTA_TABLE") == 254:
                oif = route.get_attr("RTA_OIF")
                if oif is None:  # multipath: the first hop's link
                    hops = route.get_attr("RTA_MULTIPATH") or []
                    oif = hops[0]["oif"] if hops else None
                if oif is not None:
                    return int(oif), family == socket.AF_INET6
    raise core.NetlinkError("find the underlay", errno_mod.ENETUNREACH, "no default route")
