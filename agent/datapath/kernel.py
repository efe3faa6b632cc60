"""The kernel's WireGuard as the agent's device, over generic netlink."""

from __future__ import annotations

from collections.abc import Sequence

from podwire.agent import wgdevice
from podwire.agent.datapath import link
from podwire.agent.netlink import wireguard


class KernelBackend:
    datapath = "kernel"

    def __init__(
        self,
        device: str,
        *,
        netns: str | None = None,
        mtu: int = 0,
        underlay_address: str | None = None,
        wanted: link.Wanted = link.ALL,
    ) -> None:
        self.device = device
        self.netns = netns
        self._link = link.Link(device, netns, mtu, underlay_address, wanted)

    def ensure_device(self) -> None:
        """Creates the link; raises core.KernelWireguardUnavailable without the module."""
        wireguard.create_device(self.device, netns=self.netns)
        self._link.configure(kernel=True)

    def remove(self) -> None:
        link.delete(self.device, self.netns)

    def identity(self) -> object | None:
        return link.ifindex(self.device, self.netns)

    def set_private_key(self, raw: bytes) -> None:
        wireguard.set_device(self.device, private_key=raw, netns=self.netns)

    def set_listen_port(self, port: int) -> None:
        wireguard.set_device(self.device, listen_port=port, netns=self.netns)

    def read(self) -> wgdevice.Device:
        return wireguard.read_device(self.device, netns=self.netns)

    def apply(self, changes: Sequence[wgdevice.PeerChange]) -> None:
        # The kernel cannot rename a peer: see wgdevice.without_renames.
        for change in wgdevice.without_renames(changes):
            wireguard.set_peer(self.device, change, netns=self.netns)
        self._link.keep_threaded_napi()  # a device's first peer gives it NAPI to thread

    def features(self) -> tuple[str, ...]:
        return self._link.applied

    def mtu(self) -> int:
        return self._link.applied_mtu
