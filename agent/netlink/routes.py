"""podwire's routes: a route per peer's pod CIDR through the device, and the fail-closed routes.

podwire's routes carry their own routing protocol number, PROTO, so that they can be read back
and told apart from everyone else's: the per-peer routes through the device, and the fail-closed
routes (type unreachable) over the whole cluster pod range. A peer's route is more specific than
the fail-closed one, so only traffic to a node without a programmed peer hits the latter, and
is refused instead of leaving the node in clear.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import socket
from collections.abc import Iterable, Iterator
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError

from podwire.agent import wgdevice
from podwire.agent.netlink import core

# Between the kernel's own numbers (< 20) and the well-known daemons' (bird 12, zebra 11,
# cilium 0xcf...): 251 is not registered in iproute2's rt_protos.
PROTO: Final = 251
FAIL_CLOSED_TYPE: Final = "unreachable"  # the sender gets EHOSTUNREACH at once, not a timeout
_RTN_UNICAST: Final = 1
_RTN_UNREACHABLE: Final = 7
_SCOPE_LINK: Final = 253


def apply_routes(
    device: str,
    add: Iterable[wgdevice.IPNetwork],
    remove: Iterable[wgdevice.IPNetwork],
    *,
    netns: str | None = None,
) -> None:
    """Adds, then removes, podwire's routes through device over one netlink socket.

    One socket for the whole batch: a full sync of thousands of peers is thousands of routes,
    and opening a socket (in a namespace, a helper process) per route costs seconds.
    """
    with core.iproute(netns) as ipr:
        with core.errors(f"find link {device}"):
            index = core.index(ipr, device)
        for dst in add:
            with core.errors(f"add route {dst} dev {device}"):
                ipr.route(
                    "replace",
                    dst=str(dst),
                    family=_family(dst),
                    oif=index,
                    proto=PROTO,
                    scope=_SCOPE_LINK,
                )
        for dst in remove:
            with core.errors(f"remove route {dst} dev {device}"):
                _delete(
                    ipr,
                    dst=str(dst),
                    family=_family(dst),
                    oif=index,
                    proto=PROTO,
                    scope=_SCOPE_LINK,
                )


def list_routes(device: str, *, netns: str | None = None) -> list[wgdevice.IPNetwork]:
    """podwire's routes through device (not the fail-closed ones)."""
    with core.errors(f"list routes on {device}"), core.iproute(netns) as ipr:
        index = core.index(ipr, device)
        return [
            net
            for route, net in _own_routes(ipr)
            if route["type"] == _RTN_UNICAST and route.get_attr("RTA_OIF") == index
        ]


def add_fail_closed(cidr: wgdevice.IPNetwork, *, netns: str | None = None) -> None:
    """Refuses traffic to cidr unless a more specific route (a peer's) takes it; idempotent."""
    with core.errors(f"add fail-closed route {cidr}"), core.iproute(netns) as ipr:
        ipr.route(
            "replace", dst=str(cidr), family=_family(cidr), type=FAIL_CLOSED_TYPE, proto=PROTO
        )


def remove_fail_closed(cidr: wgdevice.IPNetwork, *, netns: str | None = None) -> None:
    with core.errors(f"remove fail-closed route {cidr}"), core.iproute(netns) as ipr:
        _delete(ipr, dst=str(cidr), family=_family(cidr), type=FAIL_CLOSED_TYPE, proto=PROTO)


def list_fail_closed(*, netns: str | None = None) -> list[wgdevice.IPNetwork]:
    with core.errors("list fail-closed routes"), core.iproute(netns) as ipr:
        return [net for route, net in _own_routes(ipr) if route["type"] == _RTN_UNREACHABLE]


def _family(net: wgdevice.IPNetwork) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def _own_routes(ipr: Any) -> Iterator[tuple[Any, wgdevice.IPNetwork]]:
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            if route["proto"] != PROTO or route.get_attr("RTA_TABLE") != 254:
                continue
            dst = route.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            yield route, ipaddress.ip_network(f"{dst}/{route['dst_len']}")


def _delete(ipr: Any, **spec: Any) -> None:
    try:
        ipr.route("del", **spec)
    except PrNetlinkError as exc:
        if exc.code not in (errno_mod.ESRCH, errno_mod.ENOENT):  # already gone is the goal
            raise
