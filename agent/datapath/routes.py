"""podwire's routes: one through the device per peer pod CIDR, and the fail-closed backstop.

The backstop is an unreachable route over each cluster pod CIDR: more specific peer routes win,
so only traffic to a node with no programmed peer hits it, and it is refused instead of leaving
the node in clear. It is installed before anything else the agent does.
"""

from __future__ import annotations

from collections.abc import Iterable

from podwire.agent import reconcile, wgdevice
from podwire.agent.netlink import routes as nl_routes


class Routes:
    def __init__(self, device: str, *, netns: str | None = None) -> None:
        self.device = device
        self.netns = netns

    def install_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None:
        for cidr in cidrs:
            nl_routes.add_fail_closed(cidr, netns=self.netns)

    def remove_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None:
        for cidr in cidrs:
            nl_routes.remove_fail_closed(cidr, netns=self.netns)

    def list_fail_closed(self) -> list[wgdevice.IPNetwork]:
        return nl_routes.list_fail_closed(netns=self.netns)

    def list_routes(self) -> list[wgdevice.IPNetwork]:
        """The device's peer routes, without the fail-closed ones."""
        return nl_routes.list_routes(self.device, netns=self.netns)

    def apply(self, plan: reconcile.RoutePlan) -> None:
        # Add before removing, so a CIDR that moves is never without a route.
        if not plan.empty:
            nl_routes.apply_routes(self.device, plan.add, plan.remove, netns=self.netns)
