"""The agent assembled: one typed factory builds every component from the configuration.

Start order is the design's: fail-closed first (before the agent waits for anything), the
probes' HTTP server, the key, the node's address (its InternalIP, which the device's MTU
derives from), the device, the watches, the local API, and the control loop. Stop is the
reverse, and leaves the device, its peers and routes as they are, so traffic keeps flowing
while the next agent starts; only an agent an uninstall armed removes them as it stops.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from podwire.agent import clock as clock_mod
from podwire.agent import (
    component,
    config,
    controller,
    events,
    keystore,
    kube,
    log,
    publisher,
    reconcile,
    reconciler,
    watchdog,
    watches,
)
from podwire.agent.datapath import backend, select
from podwire.agent.datapath import component as datapath_mod
from podwire.agent.datapath import routes as routes_mod

NODE_POLL = 2.0  # how often the agent looks for its Node while it waits for one


@dataclasses.dataclass
class Agent:
    cfg: config.Config
    apiserver: publisher.WgnodeApi
    api_error: type[Exception]
    clock: clock_mod.Clock
    broadcaster: events.Broadcaster
    keys: keystore.KeyStore
    datapath: datapath_mod.Datapath
    watches: watches.Watches
    reconciler: reconciler.Reconciler
    publisher: publisher.Publisher
    watchdog: watchdog.Watchdog
    controller: controller.Controller
    # The servers that show the agent (metrics.HttpServer, api.ApiServer): they take the
    # agent, so they are added once it is assembled.
    http: component.Component | None = None
    local_api: component.Component | None = None
    phase: str = "starting"  # what start-up is doing, while it is not done
    started: bool = False

    def components(self) -> list[component.Component]:
        parts: list[component.Component | None] = [
            self.keys,
            self.datapath,
            self.http,
            self.watches,
            self.reconciler,
            self.publisher,
            self.watchdog,
            self.local_api,
            self.controller,
        ]
        return [c for c in parts if c is not None]

    def health(self) -> list[tuple[str, component.Health]]:
        return [(c.name, c.health()) for c in self.components()]

    def ready(self) -> tuple[bool, str]:
        """Ready once started and every component is healthy; else the first reason why not."""
        if not self.started:
            return False, self.phase
        for name, h in self.health():
            if not h.ok:
                return False, f"{name}: {h.message}"
        return True, "ready"

    def start(self, stop: threading.Event, *, loop: bool = True) -> bool:
        """Brings the agent up in the design's order; False if `stop` was set meanwhile.

        With loop=False the control loop's thread is not started: the unit tests turn it
        by hand (`controller.step`).
        """
        self.datapath.start()  # first of all: pod traffic with no peer is dropped
        if self.http is not None:
            self.http.start()  # probes answer while the agent waits for its Node
        self.phase = "loading the key"
        self.keys.start()
        self.phase = f"waiting for Node {self.cfg.node_name} and its InternalIP"
        address = self.wait_for_node_address(stop)
        if stop.is_set():
            return False
        self.phase = (
            (
                "waiting for the userspace engine's UAPI socket (engine mode external)"
                if self.cfg.lanes == 1
                else f"waiting for the {self.cfg.lanes} lanes' userspace engines' UAPI sockets"
                " (engine mode external: one engine per lane)"
            )
            if self.cfg.engine_mode == "external" and self.cfg.datapath == "userspace"
            else "bringing up the device"
        )
        self.datapath.bring_up(address)
        log.get("agent").info(
            "device_ready", datapath=self.datapath.kind, public_key=self.keys.public_key
        )
        self.watches.start()
        if self.local_api is not None:
            self.local_api.start()
        if loop:
            self.controller.start()
        self.started = True
        return True

    def stop(self) -> None:
        """Stops every component; the node keeps its devices, routes and rules for the next
        agent, unless an uninstall armed this one (`controller.uninstall_armed`): then they
        are removed from the node, all but the key folder."""
        for c in reversed(self.components()):
            c.stop()
        if self.controller.uninstall_armed:
            self.remove_from_node()

    def remove_from_node(self) -> None:
        logger = log.get("agent")
        try:
            removed = self.datapath.remove_from_node()
        except Exception as e:  # logged; the agent still exits, the kubelet does the rest
            logger.error("uninstall_cleanup_failed", error=str(e))
            return
        logger.info("uninstall_cleanup_done", removed=removed)

    def wait_for_node_address(self, stop: threading.Event) -> str | None:
        """The Node's primary InternalIP (None if it has none); waits for the Node to exist."""
        logger = log.get("agent")
        while not stop.is_set():
            try:
                node = self.apiserver.get_node(self.cfg.node_name)
            except self.api_error as e:
                logger.warning("node_unreadable", error=str(e))
                node = None
            if node is not None:
                ips = reconcile.internal_ips(node)
                return str(ips[0]) if ips else None
            stop.wait(NODE_POLL)
        return None


def build(
    cfg: config.Config,
    *,
    client: kube.Client,
    clock: clock_mod.Clock | None = None,
    open_backend: datapath_mod.OpenBackend | None = None,
    stop: threading.Event | None = None,
) -> Agent:
    """The agent for a cluster: watches over the apiserver, the backend its config selects.
    `stop` ends a wait at start-up for the engine's DaemonSet (engine mode external)."""
    wakeup = threading.Event()

    def informer(kind: str) -> kube.Informer:
        return kube.Informer(client, kind, on_change=wakeup.set, resync_period=cfg.resync_period)

    parts = node_parts(cfg, stop)
    if open_backend is not None:
        parts["open_backend"] = open_backend
    return assemble(
        cfg,
        api=client,
        api_error=kube.KubeError,
        emit=client.emit_event,
        watched=watches.Watches(informer("nodes"), informer("wgnodes")),
        wakeup=wakeup,
        **parts,
        clock=clock or clock_mod.MonotonicClock(),
        apiserver=client.server_url,
    )


def node_parts(cfg: config.Config, stop: threading.Event | None = None) -> dict[str, Any]:
    """What assemble takes from the node itself, as the real agent has it: the backends of
    lane 0 and the other lanes, the retiring of lanes an earlier agent left, the kernel's
    multipath hash and the routes (the kernel tier's agents are assembled with these too)."""
    return {
        "open_backend": _opener(cfg, stop),
        "open_lane": _lane_opener(cfg, stop),
        "retire_lane": lambda lane: select.retire_lane(cfg, lane),
        "flow_hash": datapath_mod.NodeFlowHash(),
        "routes": routes_mod.Routes(
            cfg.device,
            strict=cfg.strict_mode,
            devices=[cfg.lane_device(i) for i in range(cfg.lanes)],
        ),
    }


def assemble(
    cfg: config.Config,
    *,
    api: publisher.WgnodeApi,
    api_error: type[Exception],
    emit: Callable[..., object] | None,
    watched: watches.Watches,
    wakeup: threading.Event,
    open_backend: datapath_mod.OpenBackend,
    routes: datapath_mod.RoutesLike,
    clock: clock_mod.Clock,
    apiserver: str = "",
    open_lane: Callable[[int], datapath_mod.OpenLane] | None = None,
    retire_lane: datapath_mod.RetireLane | None = None,
    flow_hash: datapath_mod.FlowHash | None = None,
) -> Agent:
    """Every component of one agent, wired to what it needs; the unit tests pass fakes here.

    `apiserver` is the URL the agent reaches the apiserver at: its address is guarded like a
    node's (no peer's pod CIDR may cover it). `open_lane(i)` opens lane i's backend (lanes
    above 1); it must pick the datapath lane 0 got. `retire_lane(i)` takes away lane i's device
    where an earlier agent had more lanes; the key files of those lanes go in any case.
    `flow_hash` is the node's multipath hash, which lanes set; without it (fakes) no kernel
    setting is touched."""
    broadcaster = events.Broadcaster()
    recorder = events.Recorder(broadcaster, emit=emit, wall=clock.wall)
    retired = select.retired_lanes(cfg)
    keys = keystore.KeyStore(
        cfg.key_path,
        lane_paths=tuple(cfg.lane_key_path(i) for i in range(1, cfg.lanes)),
        retired_paths=tuple(cfg.lane_key_path(i) for i in retired),
    )
    if cfg.lanes > 1 and open_lane is None:
        raise ValueError("lanes above 1 need open_lane: each lane has a backend of its own")
    lanes = [
        datapath_mod.Lane(
            index=i,
            device=cfg.lane_device(i),
            listen_port=cfg.lane_port(i),
            open_backend=open_lane(i),
        )
        for i in range(1, cfg.lanes)
        if open_lane is not None
    ]
    datapath = datapath_mod.Datapath(
        device=cfg.device,
        listen_port=cfg.listen_port,
        cluster_pod_cidrs=cfg.cluster_pod_cidrs,
        fail_closed=cfg.fail_closed,
        open_backend=open_backend,
        routes=routes,
        keys=keys,
        lanes=lanes,
        retire_lane=retire_lane,
        retired_lanes=retired,
        flow_hash=flow_hash,
    )
    rec = reconciler.Reconciler(
        node_name=cfg.node_name,
        resync_period=cfg.resync_period,
        datapath=datapath,
        watches=watched,
        keys=keys,
        recorder=recorder,
        clock=clock,
        protected=reconcile.server_addresses(apiserver),
    )
    pub = publisher.Publisher(
        node_name=cfg.node_name,
        listen_port=cfg.listen_port,
        api=api,
        api_error=api_error,
        keys=keys,
        watches=watched,
        datapath=datapath,
        reconciler=rec,
        clock=clock,
        recorder=recorder,
    )
    dog = watchdog.Watchdog(datapath=datapath, reconciler=rec, recorder=recorder)
    ctl = controller.Controller(
        resync_period=cfg.resync_period,
        keys=keys,
        datapath=datapath,
        reconciler=rec,
        publisher=pub,
        watchdog=dog,
        recorder=recorder,
        clock=clock,
        wakeup=wakeup,
    )
    agent = Agent(
        cfg=cfg,
        apiserver=api,
        api_error=api_error,
        clock=clock,
        broadcaster=broadcaster,
        keys=keys,
        datapath=datapath,
        watches=watched,
        reconciler=rec,
        publisher=pub,
        watchdog=dog,
        controller=ctl,
    )
    pub.readiness = agent.ready  # the Ready condition says what /readyz says
    return agent


def _lane_opener(
    cfg: config.Config, stop: threading.Event | None
) -> Callable[[int], datapath_mod.OpenLane]:
    """Lane i's backend: its own device (and, on userspace, its own engine), on the datapath
    lane 0 got."""

    def for_lane(lane: int) -> datapath_mod.OpenLane:
        def open_backend(underlay_address: str | None, datapath: str) -> backend.Backend:
            return select.open_lane(
                cfg, lane, datapath=datapath, underlay_address=underlay_address, stop=stop
            )

        return open_backend

    return for_lane


def _opener(cfg: config.Config, stop: threading.Event | None) -> datapath_mod.OpenBackend:
    def open_backend(underlay_address: str | None) -> backend.Backend:
        return select.open_backend(cfg, underlay_address=underlay_address, stop=stop)

    return open_backend
