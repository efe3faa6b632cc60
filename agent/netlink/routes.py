"""podwire's routes: a route per peer's pod CIDR through the device, and the fail-closed routes.

podwire's routes carry their own routing protocol number, PROTO, so that they can be read back
and told apart from everyone else's: the per-peer routes through the device, and the fail-closed
routes (type unreachable) over the whole cluster pod range. A peer's route is more specific than
the fail-closed one, so only traffic to a node without a programmed peer hits the latter, and
is refused instead of leaving the node in clear.

With strictMode the same routes live in podwire's own table, TABLE, which a rule consults before
the main table (`rules`), with a `throw` route for the node's own pod CIDRs so that local pods
are still found in main. `dump` reads every table, so that a route that would take pod traffic
past the device can be found and reported.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import ipaddress
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError
from pyroute2.netlink.rtnl import RTM_GETROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from podwire.agent import wgdevice
from podwire.agent.netlink import core

# Between the kernel's own numbers (< 20) and the well-known daemons' (bird 12, zebra 11,
# cilium 0xcf...): 251 is not registered in iproute2's rt_protos.
PROTO: Final = 251
FAIL_CLOSED_TYPE: Final = "unreachable"  # the sender gets EHOSTUNREACH at once, not a timeout
MAIN: Final = 254
LOCAL: Final = 255
TABLE: Final = 0x7077  # "pw": podwire's own, for strictMode
_RTN_UNICAST: Final = 1
_TYPES: Final = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable",
                 8: "prohibit", 9: "throw"}  # fmt: skip
_TYPE_NUMBERS: Final = {name: number for number, name in _TYPES.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Any route of any table, as `dump` reads it: enough to tell whether it bypasses podwire."""

    dst: wgdevice.IPNetwork
    table: int
    type: str  # unicast, unreachable, throw, ...
    proto: int
    device: str | None  # the output link, if any

    def __str__(self) -> str:
        via = f" dev {self.device}" if self.device else ""
        kind = "" if self.type == "unicast" else f"{self.type} "
        table = "main" if self.table == MAIN else str(self.table)
        return f"{kind}{self.dst}{via} table {table} proto {self.proto}"


_SCOPE_LINK: Final = 253


def apply_routes(
    device: str,
    add: Iterable[wgdevice.IPNetwork],
    remove: Iterable[wgdevice.IPNetwork],
    *,
    table: int = MAIN,
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
                    table=table,
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
                    table=table,
                )


def list_routes(
    device: str, *, table: int = MAIN, netns: str | None = None
) -> list[wgdevice.IPNetwork]:
    """podwire's routes through device (not the fail-closed ones)."""
    with core.errors(f"list routes on {device}"), core.iproute(netns) as ipr:
        index = core.index(ipr, device)
        return [
            net
            for route, net in _own_routes(ipr, table)
            if route["type"] == _RTN_UNICAST and route.get_attr("RTA_OIF") == index
        ]


def apply_paths(
    devices: Sequence[str],
    add: Iterable[tuple[wgdevice.IPNetwork, tuple[int, ...]]],
    remove: Iterable[wgdevice.IPNetwork],
    *,
    table: int = MAIN,
    netns: str | None = None,
) -> None:
    """Adds (or replaces), then removes, podwire's routes over the lanes' devices.

    `devices[i]` is lane i's. A route over one lane is a plain route through its device; over
    several, one multipath route with a nexthop per device, which the kernel picks among by
    the flow's hash (fib_multipath_hash_policy), so a flow stays on one lane.
    """
    with core.iproute(netns) as ipr:
        indexes = []
        for device in devices:
            with core.errors(f"find link {device}"):
                indexes.append(core.index(ipr, device))
        for dst, lanes in add:
            where = ",".join(devices[lane] for lane in lanes)
            hops: dict[str, Any] = (
                {"oif": indexes[lanes[0]]}
                if len(lanes) == 1
                else {"multipath": [_hop(dst, indexes[lane]) for lane in lanes]}
            )
            with core.errors(f"add route {dst} dev {where}"):
                ipr.route(
                    "replace",
                    dst=str(dst),
                    family=_family(dst),
                    proto=PROTO,
                    scope=_SCOPE_LINK,
                    table=table,
                    **hops,
                )
        for dst in remove:
            with core.errors(f"remove route {dst}"):
                _delete(ipr, dst=str(dst), family=_family(dst), proto=PROTO, table=table)


# IPv6 takes no multipath route whose nexthops are devices alone; a link-local gateway, onlink,
# satisfies it and means nothing on a WireGuard device (a layer-3 link: no neighbours).
_V6_GATEWAY: Final = "fe80::1"
_RTNH_F_ONLINK: Final = 4


def _hop(dst: wgdevice.IPNetwork, index: int) -> dict[str, Any]:
    if dst.version == 6:
        return {"oif": index, "gateway": _V6_GATEWAY, "flags": _RTNH_F_ONLINK}
    return {"oif": index}


def list_paths(
    devices: Sequence[str], *, table: int = MAIN, netns: str | None = None
) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
    """podwire's routes through the lanes' devices, with the lanes of their nexthops (a
    nexthop through another link, or a device that is gone, counts as no lane)."""
    with core.errors("list routes on " + ",".join(devices)), core.iproute(netns) as ipr:
        lane_of = {}
        for lane, device in enumerate(devices):
            found = ipr.link_lookup(ifname=device)
            if found:
                lane_of[found[0]] = lane
        out: dict[wgdevice.IPNetwork, tuple[int, ...]] = {}
        for route, net in _own_routes(ipr, table):
            if route["type"] != _RTN_UNICAST:
                continue
            oif = route.get_attr("RTA_OIF")
            hops = [oif] if oif else [hop["oif"] for hop in route.get_attr("RTA_MULTIPATH") or []]
            if any(hop in lane_of for hop in hops):
                out[net] = tuple(sorted(lane_of.get(hop, -1) for hop in hops))
        return out


def add_fail_closed(
    cidr: wgdevice.IPNetwork, *, table: int = MAIN, netns: str | None = None
) -> None:
    """Refuses traffic to cidr unless a more specific route (a peer's) takes it; idempotent."""
    add_typed(cidr, FAIL_CLOSED_TYPE, table=table, netns=netns)


def remove_fail_closed(
    cidr: wgdevice.IPNetwork, *, table: int = MAIN, netns: str | None = None
) -> None:
    remove_typed(cidr, FAIL_CLOSED_TYPE, table=table, netns=netns)


def list_fail_closed(*, table: int = MAIN, netns: str | None = None) -> list[wgdevice.IPNetwork]:
    return list_typed(FAIL_CLOSED_TYPE, table=table, netns=netns)


def add_typed(
    cidr: wgdevice.IPNetwork, kind: str, *, table: int = MAIN, netns: str | None = None
) -> None:
    """A route of `kind` (unreachable, throw) of podwire's over cidr in table; idempotent."""
    with core.errors(f"add {kind} route {cidr} table {table}"), core.iproute(netns) as ipr:
        ipr.route(
            "replace", dst=str(cidr), family=_family(cidr), type=kind, proto=PROTO, table=table
        )


def remove_typed(
    cidr: wgdevice.IPNetwork, kind: str, *, table: int = MAIN, netns: str | None = None
) -> None:
    with core.errors(f"remove {kind} route {cidr} table {table}"), core.iproute(netns) as ipr:
        _delete(ipr, dst=str(cidr), family=_family(cidr), type=kind, proto=PROTO, table=table)


def list_typed(
    kind: str, *, table: int = MAIN, netns: str | None = None
) -> list[wgdevice.IPNetwork]:
    """podwire's routes of `kind` (unreachable, throw) in table."""
    with core.errors(f"list {kind} routes"), core.iproute(netns) as ipr:
        return [net for route, net in _own_routes(ipr, table) if _TYPES.get(route["type"]) == kind]


def dump(*, netns: str | None = None, type: str | None = None) -> list[Route]:
    """Every route of every table but local, both families, whoever made it; with `type`,
    only routes of that type, filtered by the kernel (a few among thousands cost the few)."""
    with core.errors("dump routes"), core.iproute(netns, strict_check=True) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        out: list[Route] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            request = rtmsg()
            request["family"] = family
            if type is not None:
                request["type"] = _TYPE_NUMBERS[type]
            request["header"]["type"] = RTM_GETROUTE
            request["header"]["flags"] = NLM_F_DUMP | NLM_F_REQUEST
            # nlm_request_batch: IPRoute.nlm_request of pyroute2 0.9.7 fails on its own status.
            for route in ipr.nlm_request_batch([request]):
                table = route.get_attr("RTA_TABLE") or route["table"]
                if table == LOCAL:
                    continue
                oif = route.get_attr("RTA_OIF")
                out.append(
                    Route(
                        dst=_dst(route, family),
                        table=int(table),
                        type=_TYPES.get(route["type"], str(route["type"])),
                        proto=int(route["proto"]),
                        device=names.get(oif) if oif else _multipath_device(route, names),
                    )
                )
        return out


def _family(net: wgdevice.IPNetwork) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def _own_routes(ipr: Any, table: int) -> Iterator[tuple[Any, wgdevice.IPNetwork]]:
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            if route["proto"] != PROTO or route.get_attr("RTA_TABLE") != table:
                continue
            yield route, _dst(route, family)


def _dst(route: Any, family: int) -> wgdevice.IPNetwork:
    dst = route.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return ipaddress.ip_network(f"{dst}/{route['dst_len']}")


def _multipath_device(route: Any, names: dict[int, str]) -> str | None:
    hops = route.get_attr("RTA_MULTIPATH") or []
    devices = sorted({names.get(hop["oif"], str(hop["oif"])) for hop in hops})
    return ",".join(devices) or None


def _delete(ipr: Any, **spec: Any) -> None:
    try:
        ipr.route("del", **spec)
    except PrNetlinkError as exc:
        if exc.code not in (errno_mod.ESRCH, errno_mod.ENOENT):  # already gone is the goal
            raise
