"""The agent's datapath component: fail-closed first, then the device with the node's key.

Start-up runs in two steps because the device's MTU derives from the underlay, which the
agent knows only once its Node has an InternalIP: `start` installs the fail-closed backstop at
once (before the agent waits for anything, so pod traffic with no peer is dropped, never sent
in clear), and `bring_up` opens the backend for the underlay address and gives the device the
node's key and port. `restore` does that again for a device that was lost. `guard`, on every
pass, puts back what of the backstop (and with strictMode, podwire's table and rules) someone
removed, and reports routes that would carry pod traffic past the device. `survey`, when the
device comes up and at each resync (the publisher's call), reads the node's kernel settings
that cost WireGuard throughput and keeps them as advisories.

With lanes (the setting `lanes`), the node has a device per lane, each with its own key (from
the key store's lanes), port and backend (on userspace, an engine of its own); lane 0 is the
device as it always was. They come up, are checked and are restored together, and the node's
multipath hash is set to layer 4 so that a flow stays on one lane and flows spread. Lanes an
earlier agent had beyond this one's (`lanes` lowered) are retired when the device comes up
(`retire`): routes stop using them first, then their devices (and engines) go.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from podwire.agent import advisories, component, keystore, log, reconcile, wgdevice
from podwire.agent.datapath import backend as backend_mod
from podwire.agent.datapath import link
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.netlink import multipath
from podwire.api import wgnode


class RoutesLike(Protocol):
    strict: bool  # strictMode: the routes live in podwire's own table, consulted before main

    def install_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None: ...
    def list_routes(self) -> list[wgdevice.IPNetwork]: ...
    def remove_all(self) -> list[str]: ...
    def apply(self, plan: reconcile.RoutePlan) -> None: ...
    def list_paths(self) -> dict[wgdevice.IPNetwork, tuple[int, ...]]: ...
    def apply_paths(self, plan: reconcile.PathPlan) -> None: ...
    def guard(
        self,
        cluster: Sequence[wgdevice.IPNetwork],
        *,
        own: Sequence[wgdevice.IPNetwork],
        fail_closed: bool,
        underlay_address: str | None,
        look_for_competing: bool = True,
    ) -> routes_mod.Guarded: ...


OpenBackend = Callable[[str | None], backend_mod.Backend]  # underlay address -> backend
# A lane's: underlay address, the datapath lane 0 got (kernel, userspace) -> backend
OpenLane = Callable[[str | None, str], backend_mod.Backend]
# Takes away lane i's device left by an agent with more lanes: what it did, None if none was.
RetireLane = Callable[[int], str | None]


@dataclasses.dataclass
class Lane:
    """One of the node's WireGuard devices beyond the first (lane 0 is the Datapath's own)."""

    index: int
    device: str
    listen_port: int
    open_backend: OpenLane
    backend: backend_mod.Backend | None = None
    identity: object | None = None


class FlowHash(Protocol):
    """The node's multipath hash, which lanes need by flow (layer 4); `NodeFlowHash` on a node.
    A Datapath without one (the unit tests' fakes) touches no kernel setting."""

    def by_flow(self) -> None: ...
    def reset(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class NodeFlowHash:
    """The hash of the namespace the devices live in (None: the agent's own)."""

    netns: str | None = None

    def by_flow(self) -> None:
        multipath.hash_by_flow(netns=self.netns)

    def reset(self) -> None:
        """Back to layer 3, the kernel's default."""
        multipath.restore(dict.fromkeys(multipath.SETTINGS, 0), netns=self.netns)


class Surveyor(Protocol):
    """Reads the node's settings for the advisories (link.survey; the unit tests' fake)."""

    def __call__(
        self,
        datapath: str,
        device: str,
        features: tuple[str, ...],
        *,
        underlay_address: str | None,
        netns: str | None,
    ) -> advisories.Facts: ...


class Datapath:
    name = "datapath"

    def __init__(
        self,
        *,
        device: str,
        listen_port: int,
        cluster_pod_cidrs: Sequence[wgdevice.IPNetwork],
        fail_closed: bool,
        open_backend: OpenBackend,
        routes: RoutesLike,
        keys: keystore.KeyStore,
        netns: str | None = None,
        surveyor: Surveyor = link.survey,
        lanes: Sequence[Lane] = (),
        retire_lane: RetireLane | None = None,
        retired_lanes: Sequence[int] = (),
        flow_hash: FlowHash | None = None,
    ) -> None:
        self.device = device
        self.lanes = tuple(lanes)  # lanes 1..N-1
        self._retire_lane = retire_lane
        self.retired_lanes = tuple(retired_lanes)  # lanes above N-1 an earlier agent may have
        self.retired: tuple[str, ...] = ()  # what `retire` took away
        self.flow_hash = flow_hash
        self.listen_port = listen_port
        self.cluster_pod_cidrs = tuple(cluster_pod_cidrs)
        self.fail_closed = fail_closed
        self.routes = routes
        self._open_backend = open_backend
        self._keys = keys
        self.backend: backend_mod.Backend | None = None
        self.identity: object | None = None  # of the device as last brought up
        self.features: tuple[str, ...] = ()
        self.mtu = 0
        self.fail_closed_installed = False
        self.underlay_address: str | None = None
        self.netns = netns  # where the device lives: None, the agent's own namespace
        self.surveyor = surveyor
        self.advisories: tuple[advisories.Advisory, ...] = ()

    @property
    def kind(self) -> str:
        """kernel or userspace; empty before the backend is chosen."""
        return self.backend.datapath if self.backend else ""

    def start(self) -> None:
        if self.fail_closed:
            self.routes.install_fail_closed(self.cluster_pod_cidrs)
            self.fail_closed_installed = True

    def stop(self) -> None:
        pass  # the device, its peers and routes stay: traffic flows while the next agent starts

    def remove_from_node(self) -> list[str]:
        """Everything the datapath made on the node goes: every lane's device (a userspace
        engine ends), the peers' routes with them, the backstops, strictMode's table and rules,
        and with lanes the multipath hash goes back to the kernel's default. Only at uninstall
        (an armed agent told to stop): pods lose their way to other nodes, in clear or not.
        The key folder stays. What it removed, for the log; a step that fails does not keep
        the next from running, and the first failure is raised at the end."""
        done: list[str] = []
        failed: list[Exception] = []
        for lane in reversed(self.lanes):
            self._remove_device(lane.device, lane.backend, done, failed)
        self._remove_device(self.device, self.backend, done, failed)
        try:
            done += self.routes.remove_all()
        except Exception as e:
            failed.append(e)
        if self.lanes and self.flow_hash is not None:
            try:
                self.flow_hash.reset()
                done.append("multipath hash back to layer 3 (the kernel's default)")
            except OSError as e:
                failed.append(e)
        self.fail_closed_installed = False
        if failed:
            raise failed[0]
        return done

    def _remove_device(
        self,
        device: str,
        backend: backend_mod.Backend | None,
        done: list[str],
        failed: list[Exception],
    ) -> None:
        try:
            if backend is not None:
                backend.remove()
            else:  # never brought up by this agent: whatever link has the name is ours
                link.delete(device, self.netns)
            done.append(f"device {device}")
        except Exception as e:
            failed.append(e)

    def bring_up(self, underlay_address: str | None) -> None:
        """Chooses the backend for the underlay, then brings the device up with key and port."""
        self.backend = self._open_backend(underlay_address)
        self.underlay_address = underlay_address
        self.restore()
        self.retire()

    def retire(self) -> None:
        """Lanes above this agent's that an earlier agent left (`lanes` lowered) go. First
        podwire's routes stop using their devices, narrowed in place to the lanes that stay, so
        no flow meets the backstop meanwhile; then each device goes, with its engine (see
        `select.retire_lane`); with one lane left the multipath hash goes back to the
        kernel's default, as at uninstall. A failure is logged, never raised: the node's own
        lanes carry its traffic without this, and the next start tries again."""
        if self._retire_lane is None or not self.retired_lanes:
            return
        logger = log.get("datapath")
        try:
            self._narrow_routes()
        except Exception as e:
            logger.error("retire_lanes_failed", step="narrow routes", error=str(e))
            return  # a device taken away now would take its routes, and their flows, with it
        done: list[str] = []
        for lane in self.retired_lanes:
            try:
                what = self._retire_lane(lane)
            except Exception as e:
                logger.error("retire_lanes_failed", lane=lane, error=str(e))
                continue
            if what:
                done.append(what)
        if done and not self.lanes and self.flow_hash is not None:
            try:
                self.flow_hash.reset()
                done.append("multipath hash back to layer 3 (the kernel's default)")
            except OSError as e:
                logger.error("retire_lanes_failed", step="multipath hash", error=str(e))
        if done:
            logger.info("lanes_retired", lanes=self.lane_count, removed=done)
        self.retired = tuple(done)

    def _narrow_routes(self) -> None:
        """podwire's routes with a nexthop through no lane of this agent's (a retired lane's
        device: lane -1) go over the lanes they have that stay."""
        narrowed = tuple(
            (net, kept)
            for net, lanes in self.routes.list_paths().items()
            if -1 in lanes and (kept := tuple(lane for lane in lanes if lane >= 0))
        )
        if narrowed:
            self.routes.apply_paths(reconcile.PathPlan(add=narrowed))

    def restore(self) -> None:
        """Every lane's device exists with its key and port; peers are the caller's business."""
        b = self.require()
        b.ensure_device()
        b.set_private_key(self._keys.key.raw)
        b.set_listen_port(self.listen_port)
        self.features = tuple(b.features())
        self.mtu = b.mtu()
        self.identity = b.identity()
        for lane in self.lanes:
            if lane.backend is None:
                lane.backend = lane.open_backend(self.underlay_address, b.datapath)
            lane.backend.ensure_device()
            lane.backend.set_private_key(self._keys.lane_key(lane.index).raw)
            lane.backend.set_listen_port(lane.listen_port)
            lane.identity = lane.backend.identity()
        if self.lanes and self.flow_hash is not None:
            self.flow_hash.by_flow()
        self.survey()

    @property
    def lane_count(self) -> int:
        return 1 + len(self.lanes)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every lane's device, lane 0's first."""
        return (self.device, *(lane.device for lane in self.lanes))

    def backends(self) -> list[tuple[int, backend_mod.Backend]]:
        """Every lane's backend with its lane, lane 0's first; a lane not up yet is left out."""
        out = [(0, self.require())]
        out += [(lane.index, lane.backend) for lane in self.lanes if lane.backend is not None]
        return out

    def lane_specs(self) -> tuple[wgnode.Lane, ...]:
        """Lanes 1..N-1 as the WireguardNode publishes them: each lane's key and port."""
        return tuple(
            wgnode.Lane(self._keys.lane_key(lane.index).public_key_b64(), lane.listen_port)
            for lane in self.lanes
        )

    def apply_keys(self) -> None:
        """Every lane's device gets its stored key (after a rotation): lane 0's last."""
        for lane in self.lanes:
            if lane.backend is None:
                raise RuntimeError(f"lane {lane.index}'s device {lane.device} is not up yet")
            lane.backend.set_private_key(self._keys.lane_key(lane.index).raw)
        self.set_private_key(self._keys.key.raw)

    def survey(self) -> None:
        """Reads the node's settings again and keeps what to advise; the features too, which a
        device can gain after it came up (threaded NAPI once it has peers)."""
        b = self.require()
        self.features = tuple(b.features())
        facts = self.surveyor(
            b.datapath,
            self.device,
            self.features,
            underlay_address=self.underlay_address,
            netns=self.netns,
        )
        self.advisories = advisories.find(facts)

    @property
    def strict_mode(self) -> bool:
        return self.routes.strict

    def guard(
        self, own_pod_cidrs: Sequence[wgdevice.IPNetwork], *, look_for_competing: bool
    ) -> routes_mod.Guarded:
        """Checks and puts back the backstop (and strictMode's table and rules) for this pass."""
        return self.routes.guard(
            self.cluster_pod_cidrs,
            own=own_pod_cidrs,
            fail_closed=self.fail_closed,
            underlay_address=self.underlay_address,
            look_for_competing=look_for_competing,
        )

    def set_private_key(self, raw: bytes) -> None:
        self.require().set_private_key(raw)

    def lost(self) -> bool:
        """True when the device is gone or is not the one brought up (the engine restarted)."""
        current = self.require().identity()
        if current is None or current != self.identity:
            return True
        for lane in self.lanes:
            if lane.backend is None:
                return True
            now = lane.backend.identity()
            if now is None or now != lane.identity:
                return True
        return False

    def require(self) -> backend_mod.Backend:
        if self.backend is None:
            raise RuntimeError("the datapath has no device yet")
        return self.backend

    def health(self) -> component.Health:
        closed = "fail-closed in force" if self.fail_closed_installed else "fail-closed off"
        closed += ", strictMode" if self.strict_mode else ""
        if self.backend is None:
            return component.degraded(f"{closed}; no device yet")
        features = ", ".join(self.features) or "none"
        advised = ", ".join(a.name for a in self.advisories) or "none"
        devices = (
            f"device {self.device}"
            if not self.lanes
            else f"{self.lane_count} lanes, devices {', '.join(self.devices)}"
        )
        return component.ok(
            f"{closed}; {self.kind} {devices}, features: {features}, advisories: {advised}"
        )
