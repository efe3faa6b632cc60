"""A userspace WireGuard (podwire-engine, wireguard-go) as the agent's device, over UAPI.

The engine is found by its live UAPI socket, or started if none serves the device and the engine
mode is `child` (see `supervisor`; in `external` mode its own DaemonSet runs it), and then
configured exactly as `wg` would configure it, so `wg show` works here as on the kernel.
"""

from __future__ import annotations

import errno
import pathlib
import threading
from collections.abc import Sequence

from podwire.agent import config, wgdevice
from podwire.agent.datapath import link, supervisor, uapi


class UserspaceBackend:
    datapath = "userspace"

    def __init__(
        self,
        device: str,
        *,
        engine_command: Sequence[str] | None = None,
        engine_env: dict[str, str] | None = None,
        engine_log: pathlib.Path | None = None,
        netns: str | None = None,
        socket_dir: pathlib.Path = uapi.SOCKET_DIR,
        mtu: int = 0,
        underlay_address: str | None = None,
        wanted: link.Wanted = link.ALL,
        start_timeout: float = supervisor.START_TIMEOUT,
        engine_mode: config.EngineMode = "child",
        stop: threading.Event | None = None,
    ) -> None:
        self.device = device
        self.netns = netns
        self.client = uapi.UapiClient(device, socket_dir=socket_dir)
        self.engine = supervisor.Engine(
            device,
            self.client,
            command=tuple(engine_command or supervisor.default_command()),
            env=dict(engine_env or {}),
            log_path=engine_log,
            netns=netns,
            start_timeout=start_timeout,
            external=engine_mode == "external",
            stop=stop,
        )
        self._link = link.Link(device, netns, mtu, underlay_address, wanted)

    def ensure_device(self) -> None:
        self.engine.ensure_running()
        self._link.configure(kernel=False)

    def remove(self) -> None:
        """The engine ends and its TUN link with it; in external mode the engine's DaemonSet
        ends it (and its link), so only its socket's engine is left alone."""
        self.engine.stop_engine()
        if not self.engine.external:
            link.delete(self.device, self.netns)

    def identity(self) -> object | None:
        """The link and the socket: a restarted engine has a new TUN link and a new socket."""
        index = link.ifindex(self.device, self.netns)
        if index is None:
            return None
        try:
            st = self.client.path.stat()
        except OSError:
            return None
        return (index, st.st_dev, st.st_ino)

    def set_private_key(self, raw: bytes) -> None:
        self.client.set(private_key=raw)

    def set_listen_port(self, port: int) -> None:
        self.client.set(listen_port=port)

    def read(self) -> wgdevice.Device:
        return self.client.get()

    def apply(self, changes: Sequence[wgdevice.PeerChange]) -> None:
        if not changes:
            return
        try:
            self.client.set(peers=changes)
        except uapi.UapiError as e:
            # An engine without podwire-engine's rename_to= (wireguard-go as `engine`) refuses
            # the whole request, so nothing of it applied: send it without renames.
            renames = any(c.renamed_from not in (None, c.public_key) for c in changes)
            if abs(e.errno) != errno.EINVAL or not renames:  # wireguard-go answers -22
                raise
            self.client.set(peers=wgdevice.without_renames(changes))

    def features(self) -> tuple[str, ...]:
        """The link's features, then the engine's own (it may outlive this agent and turn an
        offload off at run time, so they are read from what it publishes)."""
        return self._link.applied + self.client.engine_features()

    def mtu(self) -> int:
        return self._link.applied_mtu
