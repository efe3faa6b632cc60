"""What both backends do to the WireGuard link once it exists: MTU, offloads, up.

The MTU comes from the underlay the node's traffic leaves by, less WireGuard's overhead, unless
the configuration sets one. The offloads (GRO, BIG TCP on the device, UDP GRO forwarding on the
underlay) are applied where the kernel offers them; what was applied is reported as features.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Final

from podwire.agent import wgdevice
from podwire.agent.netlink import core, links, offloads, underlay


@dataclasses.dataclass(frozen=True, slots=True)
class Wanted:
    """The features the configuration asks for."""

    gro: bool = True
    big_tcp: bool = True
    udp_gro_forwarding: bool = True


ALL: Final = Wanted()


@dataclasses.dataclass
class Link:
    device: str
    netns: str | None
    mtu: int  # 0: from the underlay
    underlay_address: str | None
    wanted: Wanted
    applied: tuple[str, ...] = ()  # the features in force
    applied_mtu: int = 0

    def configure(self, *, kernel: bool) -> None:
        """Sets MTU and offloads and brings the link up; a TUN device's GRO is the engine's."""
        under: underlay.Underlay | None = None
        try:
            under = underlay.find(address=self.underlay_address, netns=self.netns)
        except core.NetlinkError:
            if not self.mtu:
                raise
        mtu = (
            self.mtu
            if under is None
            else wgdevice.mtu_for(under.mtu, under.ipv6, override=self.mtu)
        )
        links.set_mtu(self.device, mtu, netns=self.netns)
        self.applied_mtu = mtu
        report = offloads.apply_features(
            self.device,
            underlay_device=under.device if under else None,
            gro=self.wanted.gro and kernel,
            big_tcp=self.wanted.big_tcp and kernel,
            udp_gro_forwarding=self.wanted.udp_gro_forwarding,
            netns=self.netns,
        )
        self.applied = report.applied
        links.set_link_up(self.device, netns=self.netns)


def ifindex(device: str, netns: str | None) -> int | None:
    """The link's ifindex, None when it is gone; the watchdog asks every second."""
    if netns is None:  # the agent's own namespace: one ioctl
        try:
            return socket.if_nametoindex(device)
        except OSError:
            return None
    return links.link_index(device, netns=netns)
