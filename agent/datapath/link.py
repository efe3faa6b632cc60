"""What both backends do to the WireGuard link once it exists: MTU, offloads, up.

The MTU comes from the underlay the node's traffic leaves by, less WireGuard's overhead, unless
the configuration sets one. The offloads (GRO, BIG TCP on the device, UDP GRO forwarding on the
underlay; threaded NAPI on a kernel device) are applied where the kernel offers them; what was
applied is reported as features. `survey` reads what the node's kernel says about the settings
that cost WireGuard throughput, for the advisories (agent/advisories.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from typing import Final

from podwire.agent import advisories, log, wgdevice
from podwire.agent.netlink import core, ethtool, kernelinfo, links, offloads, underlay

THREADED_NAPI: Final = "threaded_napi"


@dataclasses.dataclass(frozen=True, slots=True)
class Wanted:
    """The features the configuration asks for."""

    gro: bool = True
    big_tcp: bool = True
    udp_gro_forwarding: bool = True
    threaded_napi: bool = True


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
    _kernel: bool = False

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
        self._kernel = kernel
        self.keep_threaded_napi()

    def keep_threaded_napi(self) -> None:
        """Turns threaded NAPI on where wanted and not yet in force: when the device comes up,
        and again once it has peers (a kernel whose WireGuard device has no NAPI before its
        first peer refuses the switch until then)."""
        if not (self._kernel and self.wanted.threaded_napi) or THREADED_NAPI in self.applied:
            return
        if not kernelinfo.set_threaded_napi(self.device, netns=self.netns):
            self.applied = (*self.applied, THREADED_NAPI)


def delete(device: str, netns: str | None) -> None:
    """Deletes the link; one already gone is fine."""
    links.delete_link(device, netns=netns)


def ifindex(device: str, netns: str | None) -> int | None:
    """The link's ifindex, None when it is gone; the watchdog asks every second."""
    if netns is None:  # the agent's own namespace: one ioctl
        try:
            return socket.if_nametoindex(device)
        except OSError:
            return None
    return links.link_index(device, netns=netns)


def survey(
    datapath: str,
    device: str,
    features: tuple[str, ...],
    *,
    underlay_address: str | None,
    netns: str | None,
) -> advisories.Facts:
    """What the node's kernel says now about each setting an advisory is about."""
    cmdline = kernelinfo.cmdline()
    config_text, where = kernelinfo.kernel_config()
    if advisories.init_on_alloc(cmdline, config_text) is None:
        log.get("datapath").debug(
            "init_on_alloc_unknown", why=f"the command line does not say, and {where}"
        )
    under: str | None = None
    with contextlib.suppress(core.NetlinkError):
        under = underlay.find(address=underlay_address, netns=netns).device
    sizes: dict[str, int] | None = None
    threaded: bool | None = None
    if datapath == "kernel":
        with contextlib.suppress(core.NetlinkError):
            sizes = offloads.offload_sizes(device, netns=netns)
        threaded = kernelinfo.threaded_napi(device, netns=netns)
    return advisories.Facts(
        datapath=datapath,
        device=device,
        features=features,
        cmdline=cmdline,
        kernel_config=config_text,
        underlay_device=under,
        udp_gro_forwarding=ethtool.udp_gro_forwarding(under, netns=netns) if under else None,
        sizes=sizes,
        threaded_napi=threaded,
    )
