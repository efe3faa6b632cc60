"""The device as the control loop sees it, whether the kernel's WireGuard or the userspace engine.

The reconcile logic (reconcile.py) decides; a Backend only reads the device back and applies a
Plan, so both backends are thin and the loop is tested against FakeBackend, which behaves like
the kernel: an allowed-ip given to one peer is taken from the peer that had it, and removing a
peer removes its allowed-ips.

The userspace engine runs as its own process, in its own session, and is never stopped by the
agent: restarting the agent must not cut traffic, so a new agent finds the engine's live UAPI
socket and carries on configuring it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from podwire.agent import config, keys, netlink, reconcile, uapi_client

ENGINE_START_TIMEOUT: Final = 15.0


@dataclasses.dataclass(frozen=True, slots=True)
class PeerStats:
    """What the local API and /metrics show of a peer."""

    public_key: str
    endpoint: reconcile.Endpoint | None
    allowed_ips: tuple[reconcile.IPNetwork, ...]
    last_handshake: float | None  # unix time; None before the first handshake
    rx_bytes: int
    tx_bytes: int


class Backend(Protocol):
    datapath: str

    def ensure_device(self) -> None: ...
    def identity(self) -> object | None: ...
    def set_private_key(self, raw: bytes) -> None: ...
    def set_listen_port(self, port: int) -> None: ...
    def public_key(self) -> str | None: ...
    def read_peers(self) -> list[reconcile.ActualPeer]: ...
    def peer_stats(self) -> list[PeerStats]: ...
    def apply(self, plan: reconcile.Plan) -> None: ...
    def initiate_handshakes(self, public_keys: Sequence[str]) -> None: ...
    def features(self) -> list[str]: ...


def greeting(public_keys: Sequence[str]) -> tuple[list[uapi_client.PeerChange], ...]:
    """Two requests that make the device send each peer a keepalive now, and no more later.

    Turning a peer's persistent keepalive on sends one at once (kernel, wireguard-go and
    podwire-engine alike); with no session yet, that starts a handshake. A device that was just
    created uses this so the other nodes drop their session with its dead predecessor at once,
    instead of after WireGuard's 15 s without an answer.
    """
    return (
        [uapi_client.PeerChange(k, persistent_keepalive=1, update_only=True) for k in public_keys],
        [uapi_client.PeerChange(k, persistent_keepalive=0, update_only=True) for k in public_keys],
    )


def peer_changes(plan: reconcile.Plan) -> list[uapi_client.PeerChange]:
    """A Plan as WireGuard peer changes: removals first, so a moved allowed-ip lands last."""
    changes = [uapi_client.PeerChange(key, remove=True) for key in plan.remove]
    for update in plan.update:
        peer = update.peer
        changes.append(
            uapi_client.PeerChange(
                peer.public_key,
                endpoint=peer.endpoint if update.endpoint_changed else None,
                allowed_ips=peer.allowed_ips if update.allowed_ips_changed else (),
                replace_allowed_ips=update.allowed_ips_changed,
                update_only=True,
            )
        )
    for peer in plan.add:
        changes.append(
            uapi_client.PeerChange(
                peer.public_key,
                endpoint=peer.endpoint,
                allowed_ips=peer.allowed_ips,
                replace_allowed_ips=True,
            )
        )
    return changes


def _stats(peers: Iterable[uapi_client.PeerState]) -> list[PeerStats]:
    return [
        PeerStats(p.public_key, p.endpoint, p.allowed_ips, p.last_handshake, p.rx_bytes, p.tx_bytes)
        for p in peers
    ]


def _actual(peers: Iterable[uapi_client.PeerState]) -> list[reconcile.ActualPeer]:
    return [reconcile.ActualPeer(p.public_key, p.endpoint, p.allowed_ips) for p in peers]


def _ifindex(device: str, netns: str | None) -> int | None:
    if netns is None:  # the agent's own namespace: one ioctl, cheap enough to ask every second
        try:
            return socket.if_nametoindex(device)
        except OSError:
            return None
    return netlink.link_index(device, netns=netns)


def default_engine_command() -> tuple[str, ...]:
    """The podwire-engine console script installed next to this Python."""
    return (str(pathlib.Path(sys.executable).parent / "podwire-engine"),)


@dataclasses.dataclass
class _Link:
    """What both backends do to the link once it exists: MTU, features, up."""

    device: str
    netns: str | None
    mtu: int  # 0: from the underlay
    underlay_address: str | None
    features: tuple[bool, bool, bool]  # gro, big_tcp, udp_gro_forwarding
    applied: tuple[str, ...] = ()

    def configure(self, *, kernel: bool) -> None:
        under: netlink.Underlay | None = None
        try:
            under = netlink.underlay(address=self.underlay_address, netns=self.netns)
        except netlink.NetlinkError:
            if not self.mtu:
                raise
        mtu = (
            self.mtu
            if under is None
            else reconcile.mtu_for(under.mtu, under.ipv6, override=self.mtu)
        )
        netlink.set_mtu(self.device, mtu, netns=self.netns)
        gro, big_tcp, udp_gro = self.features
        report = netlink.apply_features(
            self.device,
            underlay_device=under.device if under else None,
            gro=gro and kernel,  # a TUN device's GRO is the engine's own business
            big_tcp=big_tcp and kernel,
            udp_gro_forwarding=udp_gro,
            netns=self.netns,
        )
        self.applied = report.applied
        netlink.set_link_up(self.device, netns=self.netns)


class UserspaceBackend:
    """The userspace engine, started if no live UAPI socket serves the device, configured over it."""

    datapath = "userspace"

    def __init__(
        self,
        device: str,
        *,
        engine_command: Sequence[str] | None = None,
        engine_env: dict[str, str] | None = None,
        engine_log: pathlib.Path | None = None,
        netns: str | None = None,
        socket_dir: pathlib.Path = uapi_client.SOCKET_DIR,
        mtu: int = 0,
        underlay_address: str | None = None,
        features: tuple[bool, bool, bool] = (True, True, True),
        start_timeout: float = ENGINE_START_TIMEOUT,
    ) -> None:
        self.device = device
        self.netns = netns
        self.client = uapi_client.UapiClient(device, socket_dir=socket_dir)
        self.engine_command = tuple(engine_command or default_engine_command())
        self.engine_env = engine_env or {}
        self.engine_log = engine_log
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None  # only when this agent started it
        self._link = _Link(device, netns, mtu, underlay_address, features)

    def ensure_device(self) -> None:
        if not self.client.alive():
            self._start_engine()
        self._link.configure(kernel=False)

    def identity(self) -> object | None:
        """Which device this is, cheaply: None when it is gone (the engine died).

        A restarted engine has a new TUN link and a new socket, so an unchanged identity means
        the device still holds what the agent programmed.
        """
        index = _ifindex(self.device, self.netns)
        if index is None:
            return None
        try:
            st = self.client.path.stat()
        except OSError:
            return None
        return (index, st.st_dev, st.st_ino)

    def _start_engine(self) -> None:
        args = [*self.engine_command, self.device]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        out = open(self.engine_log, "ab") if self.engine_log else subprocess.DEVNULL  # noqa: SIM115
        try:
            # Its own session, and never waited for or signalled by us: the engine outlives
            # the agent. Foreground, so it is ours to watch while we live.
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1", **self.engine_env},
                start_new_session=True,
            )
        finally:
            if self.engine_log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.start_timeout
        while not self.client.alive():
            if self.process.poll() is not None:
                raise uapi_client.UapiError(
                    self.device,
                    "start the engine",
                    errno.EIO,
                    f"it exited with {self.process.returncode}",
                )
            if time.monotonic() > deadline:
                raise uapi_client.UapiError(
                    self.device,
                    "start the engine",
                    errno.ETIMEDOUT,
                    f"no UAPI socket after {self.start_timeout}s",
                )
            time.sleep(0.05)

    def set_private_key(self, raw: bytes) -> None:
        self.client.set_private_key(raw)

    def set_listen_port(self, port: int) -> None:
        self.client.set_listen_port(port)

    def public_key(self) -> str | None:
        return self.client.get().public_key

    def read_peers(self) -> list[reconcile.ActualPeer]:
        return _actual(self.client.get().peers)

    def peer_stats(self) -> list[PeerStats]:
        return _stats(self.client.get().peers)

    def apply(self, plan: reconcile.Plan) -> None:
        if not plan.empty:
            self.client.set(peers=peer_changes(plan))

    def initiate_handshakes(self, public_keys: Sequence[str]) -> None:
        for changes in greeting(public_keys) if public_keys else ():
            self.client.set(peers=changes)

    def features(self) -> list[str]:
        return list(self._link.applied)


class KernelBackend:
    """The kernel's WireGuard, over generic netlink."""

    datapath = "kernel"

    def __init__(
        self,
        device: str,
        *,
        netns: str | None = None,
        mtu: int = 0,
        underlay_address: str | None = None,
        features: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        self.device = device
        self.netns = netns
        self._link = _Link(device, netns, mtu, underlay_address, features)

    def ensure_device(self) -> None:
        """Creates the link; raises netlink.KernelWireguardUnavailable without the module."""
        netlink.create_kernel_device(self.device, netns=self.netns)
        self._link.configure(kernel=True)

    def identity(self) -> object | None:
        return _ifindex(self.device, self.netns)

    def set_private_key(self, raw: bytes) -> None:
        netlink.kernel_set_device(self.device, private_key=raw, netns=self.netns)

    def set_listen_port(self, port: int) -> None:
        netlink.kernel_set_device(self.device, listen_port=port, netns=self.netns)

    def public_key(self) -> str | None:
        return netlink.kernel_read_device(self.device, netns=self.netns).public_key

    def read_peers(self) -> list[reconcile.ActualPeer]:
        return _actual(netlink.kernel_read_device(self.device, netns=self.netns).peers)

    def peer_stats(self) -> list[PeerStats]:
        return _stats(netlink.kernel_read_device(self.device, netns=self.netns).peers)

    def apply(self, plan: reconcile.Plan) -> None:
        for change in peer_changes(plan):
            netlink.kernel_set_peer(self.device, change, netns=self.netns)

    def initiate_handshakes(self, public_keys: Sequence[str]) -> None:
        for changes in greeting(public_keys) if public_keys else ():
            for change in changes:
                netlink.kernel_set_peer(self.device, change, netns=self.netns)

    def features(self) -> list[str]:
        return list(self._link.applied)


def select_backend(datapath: str, device: str, **kwargs: object) -> Backend:
    """`auto`: the kernel's if a WireGuard link can be created here, else userspace.

    The kernel backend's device is created here already, so the answer is certain.
    """
    kernel_args = {k: v for k, v in kwargs.items() if k in _KERNEL_ARGS}
    userspace = UserspaceBackend(device, **kwargs)  # type: ignore[arg-type]
    if datapath == "auto" and userspace.client.alive():
        return userspace  # an engine already serves the device: a restarted agent keeps it
    if datapath in ("auto", "kernel"):
        kernel = KernelBackend(device, **kernel_args)  # type: ignore[arg-type]
        try:
            netlink.create_kernel_device(device, netns=kernel.netns)
            return kernel
        except netlink.KernelWireguardUnavailable:
            if datapath == "kernel":
                raise
    return userspace


_KERNEL_ARGS: Final = frozenset({"netns", "mtu", "underlay_address", "features"})


def select(
    cfg: config.Config,
    *,
    netns: str | None = None,
    engine_command: Sequence[str] | None = None,
) -> tuple[Backend, Routes]:
    """The agent's backend for its config (datapath, device, MTU, features) and its Routes."""
    features = (cfg.features.gro, cfg.features.big_tcp, cfg.features.udp_gro_forwarding)
    backend = select_backend(
        cfg.datapath,
        cfg.device,
        netns=netns,
        mtu=cfg.mtu,
        features=features,
        **({"engine_command": engine_command} if engine_command else {}),
    )
    return backend, Routes(cfg.device, netns=netns)


class Routes:
    """podwire's routes: the fail-closed ones over the cluster range, and one per peer CIDR."""

    def __init__(self, device: str, *, netns: str | None = None) -> None:
        self.device = device
        self.netns = netns

    def install_fail_closed(self, cidrs: Iterable[reconcile.IPNetwork]) -> None:
        for cidr in cidrs:
            netlink.add_fail_closed(cidr, netns=self.netns)

    def remove_fail_closed(self, cidrs: Iterable[reconcile.IPNetwork]) -> None:
        for cidr in cidrs:
            netlink.remove_fail_closed(cidr, netns=self.netns)

    def list_fail_closed(self) -> list[reconcile.IPNetwork]:
        return netlink.list_fail_closed(netns=self.netns)

    def list_routes(self) -> list[reconcile.IPNetwork]:
        return netlink.list_routes(self.device, netns=self.netns)

    def apply(self, plan: reconcile.RoutePlan) -> None:
        # Add before removing, so a CIDR that moves is never without a route.
        if not plan.empty:
            netlink.apply_routes(self.device, plan.add, plan.remove, netns=self.netns)


class FakeBackend:
    """An in-memory device with the kernel's semantics, for the agent's unit tests."""

    datapath = "fake"

    def __init__(self) -> None:
        self.exists = False
        self.private_key: bytes | None = None
        self.listen_port = 0
        self.table = reconcile.PeerTable()
        self.applied: list[reconcile.Plan] = []  # every non-empty plan, for assertions
        self.fail_next: Exception | None = None  # raised (once) by the next apply
        self.generation = 0  # bumped by tests to play a device that was recreated
        self.greeted: list[str] = []  # peers asked to handshake, in order

    @property
    def peers(self) -> dict[str, reconcile.ActualPeer]:
        return {p.public_key: p for p in self.table.peers()}

    def ensure_device(self) -> None:
        self.exists = True

    def identity(self) -> object | None:
        return self.generation if self.exists else None

    def set_private_key(self, raw: bytes) -> None:
        self.private_key = raw

    def set_listen_port(self, port: int) -> None:
        self.listen_port = port

    def public_key(self) -> str | None:
        if self.private_key is None:
            return None
        return keys.encode_key(keys.public_key_of(self.private_key))

    def read_peers(self) -> list[reconcile.ActualPeer]:
        return self.table.peers()

    def peer_stats(self) -> list[PeerStats]:
        return [
            PeerStats(p.public_key, p.endpoint, p.allowed_ips, None, 0, 0)
            for p in self.table.peers()
        ]

    def apply(self, plan: reconcile.Plan) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if plan.empty:
            return
        self.applied.append(plan)
        for change in peer_changes(plan):
            self.apply_change(change)

    def apply_change(self, change: uapi_client.PeerChange) -> None:
        """One peer change with WireGuard's meaning (also usable directly by tests)."""
        if change.remove:
            self.table.remove(change.public_key)
            return
        self.table.set(
            change.public_key,
            change.endpoint,
            change.allowed_ips,
            replace_allowed_ips=change.replace_allowed_ips,
            update_only=change.update_only,
        )

    def initiate_handshakes(self, public_keys: Sequence[str]) -> None:
        self.greeted.extend(public_keys)

    def features(self) -> list[str]:
        return []
