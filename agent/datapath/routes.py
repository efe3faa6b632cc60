"""podwire's routes: one through the device per peer pod CIDR, and the fail-closed backstop.

The backstop is an unreachable route over each cluster pod CIDR, in every family the setting
lists: more specific peer routes win, so only traffic to a node with no programmed peer hits
it, and it is refused instead of leaving the node in clear. It is installed before anything
else the agent does.

In the main table, though, anyone's more specific route wins over the backstop and even over a
peer's route: a CNI's or an operator's route to a pod address would carry pod traffic past the
device, in clear. With strictMode the peers' routes and (with fail-closed) a second backstop
live in podwire's own table, which a rule consults for the cluster pod CIDRs before main, so
neither a peer's pods nor an unprogrammed node's can be taken by main; a `throw` route for the
node's own pod CIDRs sends local pods back to main. A second rule drops what arrives on the
underlay in clear from the pod range for a local pod. `guard`, called on every pass, puts back
whatever of this was removed and reports the routes that would bypass the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from podwire.agent import reconcile, wgdevice
from podwire.agent.netlink import routes as nl_routes
from podwire.agent.netlink import rules as nl_rules
from podwire.agent.netlink import underlay as nl_underlay

THROW = "throw"
_HARMLESS = frozenset({"unreachable", "blackhole", "prohibit", "throw", "local", "broadcast"})


@dataclasses.dataclass(frozen=True, slots=True)
class Guarded:
    """What a guard pass found: what it had to put (back) in place, and the routes that would
    carry remote pod traffic past the device."""

    restored: tuple[str, ...] = ()
    competing: tuple[str, ...] | None = ()  # None: not looked for this time


class Routes:
    def __init__(
        self,
        device: str,
        *,
        netns: str | None = None,
        strict: bool = False,
        devices: Sequence[str] = (),
    ) -> None:
        self.device = device
        self.netns = netns
        self.strict = strict
        self.devices = tuple(devices) or (device,)  # every lane's device, lane 0's first

    @property
    def table(self) -> int:
        """The table the peers' routes live in."""
        return nl_routes.TABLE if self.strict else nl_routes.MAIN

    def install_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None:
        for cidr in cidrs:
            nl_routes.add_fail_closed(cidr, netns=self.netns)
            if self.strict:  # harmless until the rule points at it (guard, on the first pass)
                nl_routes.add_fail_closed(cidr, table=nl_routes.TABLE, netns=self.netns)

    def remove_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None:
        for cidr in cidrs:
            nl_routes.remove_fail_closed(cidr, netns=self.netns)

    def remove_all(self) -> list[str]:
        """Every route of podwire's left once the devices are gone (the backstops in main and
        in podwire's table, strictMode's throw routes, a peer route a device did not take
        with it) and podwire's rules: at uninstall only. What it removed, for the log."""
        removed: list[str] = []
        for r in nl_routes.dump(netns=self.netns):
            if r.proto != nl_routes.PROTO:
                continue
            if r.type in (nl_routes.FAIL_CLOSED_TYPE, THROW):
                nl_routes.remove_typed(r.dst, r.type, table=r.table, netns=self.netns)
            elif r.device and not r.device.count(","):
                nl_routes.apply_routes(r.device, [], [r.dst], table=r.table, netns=self.netns)
            else:
                continue
            removed.append(str(r))
        rules = nl_rules.list_rules(netns=self.netns)
        nl_rules.remove_rules(rules, netns=self.netns)
        return removed + [f"rule {r}" for r in rules]

    def list_fail_closed(self) -> list[wgdevice.IPNetwork]:
        return nl_routes.list_fail_closed(netns=self.netns)

    def list_routes(self) -> list[wgdevice.IPNetwork]:
        """The device's peer routes, without the fail-closed ones."""
        return nl_routes.list_routes(self.device, table=self.table, netns=self.netns)

    def apply(self, plan: reconcile.RoutePlan) -> None:
        # Add before removing, so a CIDR that moves is never without a route.
        if not plan.empty:
            nl_routes.apply_routes(
                self.device, plan.add, plan.remove, table=self.table, netns=self.netns
            )

    def list_paths(self) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
        """podwire's peer routes over the lanes, with the lanes of their nexthops."""
        return nl_routes.list_paths(self.devices, table=self.table, netns=self.netns)

    def apply_paths(self, plan: reconcile.PathPlan) -> None:
        if not plan.empty:
            nl_routes.apply_paths(
                self.devices, plan.add, plan.remove, table=self.table, netns=self.netns
            )

    def guard(
        self,
        cluster: Sequence[wgdevice.IPNetwork],
        *,
        own: Sequence[wgdevice.IPNetwork],
        fail_closed: bool,
        underlay_address: str | None,
        look_for_competing: bool = True,
    ) -> Guarded:
        """Puts back the backstops and (strictMode) the throw routes and rules; reports the
        routes that bypass the device. Call it on every pass: anyone with NET_ADMIN on the
        node can delete them, and nothing else would notice. Looking for competing routes
        reads every route of the node, so the caller asks for it less often."""
        restored: list[str] = []
        main, mine = nl_routes.MAIN, nl_routes.TABLE
        # Only the backstops and throws, which the kernel picks out: a pass at 5,000 peers
        # must not read 5,000 routes to find the few it guards.
        typed = [
            r
            for kind in (nl_routes.FAIL_CLOSED_TYPE, THROW)
            for r in nl_routes.dump(netns=self.netns, type=kind)
        ]
        have = {(r.dst, r.type, r.table) for r in typed if _ours(r)}
        want = {(c, nl_routes.FAIL_CLOSED_TYPE, main) for c in cluster} if fail_closed else set()
        if self.strict:
            if fail_closed:
                want |= {(c, nl_routes.FAIL_CLOSED_TYPE, mine) for c in cluster}
            want |= {(c, THROW, mine) for c in own}
            for dst, kind, table in sorted(have, key=str):
                if kind == THROW and table == mine and (dst, kind, table) not in want:
                    nl_routes.remove_typed(dst, THROW, table=mine, netns=self.netns)
        for dst, kind, table in sorted(want - have, key=str):
            nl_routes.add_typed(dst, kind, table=table, netns=self.netns)
            restored.append(f"{kind} {dst} table {table}")
        restored += self._guard_rules(cluster, own, underlay_address)
        if not look_for_competing:
            return Guarded(tuple(restored), None)
        dumped = nl_routes.dump(netns=self.netns)
        competing = competing_routes(
            dumped, cluster=cluster, own=own, device=self.device, lanes=self.devices
        )
        return Guarded(tuple(restored), tuple(str(r) for r in competing))

    def _guard_rules(
        self,
        cluster: Sequence[wgdevice.IPNetwork],
        own: Sequence[wgdevice.IPNetwork],
        underlay_address: str | None,
    ) -> list[str]:
        have = set(nl_rules.list_rules(netns=self.netns))
        want: set[nl_rules.Rule] = set()
        if self.strict:  # without it, rules a strict run left are taken away
            want = {nl_rules.lookup(c, nl_routes.TABLE) for c in cluster}
            if underlay_address is not None:
                iif = nl_underlay.find(address=underlay_address, netns=self.netns).device
                want |= {
                    nl_rules.inbound(c, o, iif)
                    for c in cluster
                    for o in own
                    if c.version == o.version
                }
        nl_rules.add_rules(sorted(want - have, key=str), netns=self.netns)
        nl_rules.remove_rules(sorted(have - want, key=str), netns=self.netns)
        return [f"rule {r}" for r in sorted(want - have, key=str)]


def competing_routes(
    routes: Iterable[nl_routes.Route],
    *,
    cluster: Sequence[wgdevice.IPNetwork],
    own: Sequence[wgdevice.IPNetwork],
    device: str,
    lanes: Sequence[str] = (),
) -> list[nl_routes.Route]:
    """Routes, in any table but podwire's, that would carry traffic to a remote pod address
    somewhere other than the device (or, with lanes, the lanes' devices: a multipath route
    whose every nexthop is one of them stays in the tunnel): inside a cluster pod CIDR,
    outside the node's own pod CIDRs, and forwarding (an unreachable or throw route carries
    nothing)."""
    ours = {device, *lanes}
    out = []
    for r in routes:
        if r.table == nl_routes.TABLE or r.type in _HARMLESS or r.device == device:
            continue
        if r.device and set(r.device.split(",")) <= ours:
            continue
        if _inside(r.dst, cluster) and not _inside(r.dst, own):
            out.append(r)
    return sorted(out, key=str)


def _inside(net: wgdevice.IPNetwork, cidrs: Iterable[wgdevice.IPNetwork]) -> bool:
    return any(net.version == c.version and net.subnet_of(c) for c in cidrs)  # type: ignore[arg-type]


def _ours(route: nl_routes.Route) -> bool:
    return route.proto == nl_routes.PROTO and route.type in (nl_routes.FAIL_CLOSED_TYPE, THROW)
