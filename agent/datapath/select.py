"""The one place that picks the agent's backend for its configuration.

`auto` means the kernel's WireGuard if a WireGuard link can be created here, else userspace;
but a live engine already serving the device wins, so a restarted agent keeps the engine (and
its traffic) it finds. The kernel device is created here already, so the answer is certain.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from collections.abc import Sequence

from podwire.agent import config
from podwire.agent.datapath import backend, kernel, link, supervisor, uapi, userspace
from podwire.agent.netlink import core, wireguard

_IFNAMSIZ = 16


def open_lane(
    cfg: config.Config,
    lane: int,
    *,
    datapath: str,
    netns: str | None = None,
    underlay_address: str | None = None,
    engine_command: Sequence[str] | None = None,
    engine_env: dict[str, str] | None = None,
    socket_dir: pathlib.Path = uapi.SOCKET_DIR,
    stop: threading.Event | None = None,
) -> backend.Backend:
    """Lane `lane`'s backend (1..N-1): its own device, on the datapath lane 0 got, so every
    lane of a node is kernel or every lane userspace (an engine each, in child mode)."""
    lane_cfg = dataclasses.replace(
        cfg,
        device=cfg.lane_device(lane),
        listen_port=cfg.lane_port(lane),
        datapath="kernel" if datapath == "kernel" else "userspace",
        lanes=1,
    )
    return open_backend(
        lane_cfg,
        netns=netns,
        underlay_address=underlay_address,
        engine_command=engine_command,
        engine_env=engine_env,
        socket_dir=socket_dir,
        stop=stop,
    )


def retired_lanes(cfg: config.Config) -> range:
    """The lanes above the configured ones that an agent with more lanes may have left."""
    return range(cfg.lanes, config.MAX_LANES)


def retire_lane(
    cfg: config.Config,
    lane: int,
    *,
    netns: str | None = None,
    socket_dir: pathlib.Path = uapi.SOCKET_DIR,
) -> str | None:
    """Takes away lane `lane`'s device, left by an agent that had more lanes (`lanes` was
    lowered); None when there is none. Its engine ends (SIGTERM, found by its socket) and its
    link goes. In engine mode external the engine is the engine DaemonSet's container, which
    goes when that pod is made again: meanwhile its device is emptied of peers, so it carries
    nothing and holds no session. Call it once lane 0's routes no longer use the device."""
    device = cfg.lane_device(lane)
    if len(device) >= _IFNAMSIZ:
        return None  # no such link can exist
    client = uapi.UapiClient(device, socket_dir=socket_dir)
    alive = client.alive()
    if alive and cfg.engine_mode == "external":
        client.set(replace_peers=True)
        return (
            f"lane {lane}'s device {device} emptied of peers (its engine is the engine DaemonSet's)"
        )
    if alive:
        supervisor.Engine(device, client, netns=netns).stop_engine()
    elif client.path.exists():
        # An engine ended by SIGKILL leaves its socket and its features file.
        client.path.unlink(missing_ok=True)
        client.path.with_suffix(".features").unlink(missing_ok=True)
    if link.ifindex(device, netns) is None:
        return f"lane {lane}'s engine for {device}" if alive else None
    link.delete(device, netns)
    return f"lane {lane}'s device {device}" + (" and its engine" if alive else "")


def open_backend(
    cfg: config.Config,
    *,
    netns: str | None = None,
    underlay_address: str | None = None,
    engine_command: Sequence[str] | None = None,
    engine_env: dict[str, str] | None = None,
    socket_dir: pathlib.Path = uapi.SOCKET_DIR,
    stop: threading.Event | None = None,
) -> backend.Backend:
    wanted = link.Wanted(
        gro=cfg.features.gro,
        big_tcp=cfg.features.big_tcp,
        udp_gro_forwarding=cfg.features.udp_gro_forwarding,
        threaded_napi=cfg.features.threaded_napi,
    )
    command = engine_command or ((str(cfg.engine),) if cfg.engine else None)
    user = userspace.UserspaceBackend(
        cfg.device,
        engine_command=command,
        engine_env=engine_env,
        engine_log=cfg.key_path.parent / f"{cfg.device}-engine.log",
        netns=netns,
        socket_dir=socket_dir,
        mtu=cfg.mtu,
        underlay_address=underlay_address,
        wanted=wanted,
        engine_mode=cfg.engine_mode,
        stop=stop,
    )
    if cfg.datapath == "auto" and user.client.alive():
        return user
    if cfg.datapath in ("auto", "kernel"):
        try:
            wireguard.create_device(cfg.device, netns=netns)
        except core.KernelWireguardUnavailable:
            if cfg.datapath == "kernel":
                raise
        else:
            return kernel.KernelBackend(
                cfg.device,
                netns=netns,
                mtu=cfg.mtu,
                underlay_address=underlay_address,
                wanted=wanted,
            )
    return user
