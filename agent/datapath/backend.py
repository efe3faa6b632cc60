"""What the control loop asks of a WireGuard device, whichever implementation holds it.

A backend is thin: it reads the device back as a `wgdevice.Device` and applies
`wgdevice.PeerChange`s with WireGuard's meaning. Deciding what to change is the reconcile
logic's business (`reconcile`), and what a change does is written once (`wgdevice.PeerTable`),
so the kernel, the userspace engine and the unit tests' fake all agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from podwire.agent import wgdevice


class Backend(Protocol):
    datapath: str  # "kernel" or "userspace", as the WireguardNode's status says it

    def ensure_device(self) -> None:
        """The device exists and is up, configured for the underlay (created if need be)."""
        ...

    def identity(self) -> object | None:
        """Which device this is, cheaply: None when it is gone; a new value when it was replaced."""
        ...

    def set_private_key(self, raw: bytes) -> None: ...

    def set_listen_port(self, port: int) -> None: ...

    def read(self) -> wgdevice.Device:
        """The device as it is now: its public key, port and every peer with its counters."""
        ...

    def remove(self) -> None:
        """Deletes the device (and ends a userspace engine); its peers' routes go with it.
        Only at uninstall."""
        ...

    def apply(self, changes: Sequence[wgdevice.PeerChange]) -> None:
        """The changes in order, with the meaning of `wgdevice.PeerTable.apply`."""
        ...

    def features(self) -> tuple[str, ...]:
        """The performance features in force on the device (e.g. gro, big_tcp)."""
        ...

    def mtu(self) -> int:
        """The MTU the device was given when it was brought up."""
        ...
