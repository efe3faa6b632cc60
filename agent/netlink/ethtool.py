"""UDP GRO forwarding on the underlay, the one feature that only ethtool switches.

With it, the underlay coalesces the encrypted UDP packets of a flow before they reach
WireGuard, which then decrypts a batch at a time; without it, every packet is its own trip
through the stack, and a WireGuard link forwards far less. The switch is an ethtool feature,
not a netlink attribute, and the ethtool ioctl acts in the namespace of the socket it is sent
on, so the socket is made inside the node's namespace.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Final

from pyroute2 import netns as pr_netns
from pyroute2.ethtool import ethtool as pr_ethtool
from pyroute2.ethtool import ioctl as pr_ethtool_ioctl

UDP_GRO_FORWARDING: Final = "rx-udp-gro-forwarding"


def enable_udp_gro_forwarding(device: str, *, netns: str | None = None) -> str:
    """Turns the ethtool feature on; returns why not, or "" when it is on."""
    try:
        io = _ethtool_in(netns)
    except OSError as exc:
        return f"no ethtool socket: {exc.strerror}"
    try:
        io.change_ifname(device)
        features = _features(io)
        feature = features.features.get(UDP_GRO_FORWARDING)
        if feature is None or not feature.available:
            return f"{device} does not offer {UDP_GRO_FORWARDING}"
        if not feature.enable:
            feature.enable = True
            raw = io.get_features()
            pr_ethtool.EthtoolFeatures.to_ioctl(raw, features)
            io.set_features(raw)
        return ""
    except Exception as exc:  # the ioctl layer raises several kinds; all mean "not applied"
        return f"ethtool on {device}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            io.close()


def udp_gro_forwarding(device: str, *, netns: str | None = None) -> bool | None:
    """Whether the feature is on; None when the device does not offer it or cannot be asked."""
    try:
        io = _ethtool_in(netns)
    except OSError:
        return None
    try:
        io.change_ifname(device)
        feature = _features(io).features.get(UDP_GRO_FORWARDING)
        if feature is None or not feature.available:
            return None
        return bool(feature.enable)
    except Exception:  # the ioctl layer raises several kinds; all mean "cannot tell"
        return None
    finally:
        with contextlib.suppress(Exception):
            io.close()


def _features(io: Any) -> Any:
    """The features of the device io is bound to, by ethtool's names."""
    return pr_ethtool.EthtoolFeatures.from_ioctl(
        features=io.get_features(), offload_flags=io.get_offload_flags()
    )


def _ethtool_in(netns: str | None) -> Any:
    # The ethtool ioctl acts in the namespace its socket was made in: make it inside netns
    # (setns moves only this thread), then come straight back. flags=0: never create one.
    if netns is None:
        return pr_ethtool_ioctl.IoctlEthtool()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(netns, flags=0)
        try:
            return pr_ethtool_ioctl.IoctlEthtool()
        finally:
            pr_netns.setns(home, flags=0)
    finally:
        os.close(home)
