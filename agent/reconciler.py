"""The reconcile pass: keep the device and its routes equal to what the cluster asks for.

Level-triggered: whatever woke it, a pass computes the whole desired state from the two watches
(`reconcile.desired_peers`) and diffs it against the device. The device is read back in full at
start, every resync period, after any failure and whenever it was replaced; in between the pass
diffs against its own record of what it read and wrote (a `wgdevice.PeerTable`), so one change
at 5,000 nodes costs one change, not a read of 5,000 peers and routes. Nothing is removed until
both watches have listed, and nothing while the apiserver is away, so the device keeps its last
good state.

Every pass also guards the way out (`Datapath.guard`): the fail-closed backstop, and with
strictMode podwire's table and rules, are put back if someone removed them (an Event says so),
and a route that would carry remote pod traffic past the device is reported (an Event, the
Encrypted condition's reason, a metric) for as long as it is there.

With lanes, each lane's device holds lane i of every peer that has one (`reconcile.lane_peers`)
and the routes are multipath over the lanes a peer shares with this node
(`reconcile.desired_paths`); one lane is programmed as it always was.

Every peer added is greeted (a keepalive, which starts a handshake): the peers of a new device
drop the sessions they had with its predecessor now, not 15 s from now, and a node that joins
gets its session at once from whichever end learns of the other second.
"""

from __future__ import annotations

import dataclasses

from podwire.agent import clock as clock_mod
from podwire.agent import component, events, keystore, log, reconcile, watches, wgdevice
from podwire.agent.datapath import backend as backend_mod
from podwire.agent.datapath import component as datapath_mod

# Looking for routes that bypass the device reads every route of the node (5,000 at 5,000
# nodes, a few hundred milliseconds), so it is done on a pass at most this often; the guard
# of the backstops and rules, which the kernel picks out cheaply, runs on every pass.
COMPETING_SCAN_INTERVAL = 30.0


@dataclasses.dataclass
class Outcome:
    """What the passes so far have done: read by status, /metrics and the local API."""

    peers: tuple[reconcile.DesiredPeer, ...] = ()
    refusals: tuple[reconcile.Refusal, ...] = ()
    competing_routes: tuple[str, ...] = ()  # routes that would take pod traffic past the device
    restored: int = 0  # times the guard put back what someone removed
    programmed: bool = False  # the device holds what synced watches asked for
    last_error: str = ""
    passes: int = 0
    errors: int = 0  # passes that failed
    failures_in_a_row: int = 0
    last_wall: float = 0.0
    last_seconds: float = 0.0


class Reconciler:
    name = "reconciler"

    def __init__(
        self,
        *,
        node_name: str,
        resync_period: float,
        datapath: datapath_mod.Datapath,
        watches: watches.Watches,
        keys: keystore.KeyStore,
        recorder: events.Recorder,
        clock: clock_mod.Clock,
        protected: tuple[wgdevice.IPAddress, ...] = (),
    ) -> None:
        self.node_name = node_name
        self.protected = protected  # the apiserver's address: no pod CIDR may cover it
        self.resync_period = resync_period
        self.datapath = datapath
        self.watches = watches
        self.keys = keys
        self.recorder = recorder
        self.clock = clock
        self.outcome = Outcome()
        self.log = log.get("reconciler", node=node_name)
        # Each lane's device as last read back or written; None: read back on the next pass.
        self._tables: dict[int, wgdevice.PeerTable] | None = None
        self._routes: set[wgdevice.IPNetwork] | None = None
        self._paths: dict[wgdevice.IPNetwork, tuple[int, ...]] | None = None  # with lanes
        self._next_full_read = 0.0
        self._reported: set[tuple[str, str]] = set()
        self._competing_reported: set[str] = set()
        self._guarded = False
        self._next_competing_scan = 0.0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def forget_device(self) -> None:
        """The record may be wrong (a failure, a replaced device): read back on the next pass."""
        self._tables = None
        self._routes = None
        self._paths = None

    def reconcile_once(self) -> bool:
        """One pass; False when it failed (the caller retries with backoff)."""
        started = self.clock.monotonic()
        out = self.outcome
        synced = self.watches.synced
        try:
            desired = reconcile.desired_peers(
                self.watches.nodes.snapshot(),
                self.watches.wgnodes.snapshot(),
                self.node_name,
                own_public_key=self.keys.public_key,
                own_lane_keys=[lane.public_key for lane in self.keys.lanes],
                cluster_pod_cidrs=self.datapath.cluster_pod_cidrs,
                protected=self.protected,
            )
            self._program_peers(desired.peers, synced=synced, now=started)
            self._program_routes(desired.peers, synced=synced)
            self._guard(started)
            out.peers, out.refusals = desired.peers, desired.refusals
            out.programmed = synced
            out.last_error = ""
            out.failures_in_a_row = 0
            self._report_refusals(desired.refusals)
            return True
        except Exception as e:  # retried by the caller, with the device read back in full
            self.forget_device()
            out.errors += 1
            out.failures_in_a_row += 1
            out.last_error = str(e)
            self.log.error("reconcile_failed", error=str(e))
            return False
        finally:
            out.passes += 1
            out.last_wall = self.clock.wall()
            out.last_seconds = self.clock.monotonic() - started

    def _program_peers(
        self, desired: tuple[reconcile.DesiredPeer, ...], *, synced: bool, now: float
    ) -> None:
        if self._tables is None or now >= self._next_full_read:
            self._tables = {}
            self._routes = self._paths = None
            self._next_full_read = now + self.resync_period
        for lane, backend in self.datapath.backends():
            table = self._tables.get(lane)
            if table is None:
                table = self._tables[lane] = wgdevice.PeerTable(backend.read().peers)
            wanted = reconcile.lane_peers(desired, lane)
            self._program_lane(lane, backend, table, wanted, synced=synced)

    def _program_lane(
        self,
        lane: int,
        backend: backend_mod.Backend,
        table: wgdevice.PeerTable,
        desired: tuple[reconcile.DesiredPeer, ...],
        *,
        synced: bool,
    ) -> None:
        plan = reconcile.plan_peers(desired, table.peers(), synced=synced)
        if not plan.empty:  # a failed apply forgets the record: read back next pass
            changes = reconcile.plan_changes(plan)
            backend.apply(changes)
            table.apply(changes)
            if lane == 0:  # the Events say it once per node, not once per lane
                self._log_plan(plan)
            else:
                self.log.info(
                    "lane_peers_changed",
                    lane=lane,
                    added=[p.node for p in plan.add],
                    renamed=[r.peer.node for r in plan.rename],
                    removed=len(plan.remove),
                )
            # Every peer gained is greeted, so the session exists before the first packet needs
            # it: a new device's peers drop their sessions with its predecessor now, and a node
            # that joins later gets an answer at once (its own greeting reached us before we
            # knew its key, and WireGuard retries only after 5 s). A peer that rotated its key
            # is greeted so the handshake with the new key starts now.
            greet = [p.public_key for p in plan.add] + [r.peer.public_key for r in plan.rename]
            if greet:
                for request in wgdevice.greeting(greet):
                    backend.apply(request)

    def _program_routes(self, desired: tuple[reconcile.DesiredPeer, ...], *, synced: bool) -> None:
        routes = self.datapath.routes
        if self.datapath.lane_count > 1:
            self._program_paths(desired, synced=synced)
            return
        if self._routes is None:
            self._routes = set(routes.list_routes())
        plan = reconcile.plan_routes(desired, self._routes, synced=synced)
        if not plan.empty:
            routes.apply(plan)
            self._routes = (self._routes | set(plan.add)) - set(plan.remove)

    def _program_paths(self, desired: tuple[reconcile.DesiredPeer, ...], *, synced: bool) -> None:
        """Routes over the lanes: multipath over the lanes each peer shares with this node."""
        routes = self.datapath.routes
        if self._paths is None:
            self._paths = routes.list_paths()
        want = reconcile.desired_paths(desired, self.datapath.lane_count)
        plan = reconcile.plan_paths(want, self._paths, synced=synced)
        if not plan.empty:
            routes.apply_paths(plan)
            self._paths.update(plan.add)
            for net in plan.remove:
                self._paths.pop(net, None)

    @property
    def guarded(self) -> bool:
        """A pass has guarded the way out once: what is missing after that was removed."""
        return self._guarded

    def guard(self, now: float) -> None:
        """The guard alone, between passes: an idle node still has its backstop put back and
        its competing routes found. A failure is logged and left to the next pass."""
        try:
            self._guard(now)
        except Exception as e:
            self.log.error("guard_failed", error=str(e))

    def _guard(self, now: float) -> None:
        node = self.watches.node(self.node_name)
        if node is None:
            # Not known yet (a restarted agent whose watch has not listed): which throws and
            # inbound rules are the node's own is unknown, and taking them away would cut its
            # pods off. What start-up installed (the backstops) stands meanwhile.
            return
        own = reconcile.pod_cidrs(node)
        look = now >= self._next_competing_scan
        found = self.datapath.guard(own, look_for_competing=look)
        if look:
            self._next_competing_scan = now + COMPETING_SCAN_INTERVAL
        own_object = self.watches.wgnode(self.node_name)  # where the Events go
        if found.restored and self._guarded:
            self.outcome.restored += 1
            message = "put back what was removed: " + "; ".join(found.restored)
            self.log.warning("routing_restored", restored=list(found.restored))
            self.recorder.record("Warning", "RoutingRestored", message, involved=own_object)
        self._guarded = True
        if found.competing is None:
            return  # not looked for on this pass: what the last look found still stands
        self.outcome.competing_routes = found.competing
        how = (
            "strictMode keeps pod traffic in the tunnel"
            if self.datapath.strict_mode
            else "pod traffic to it leaves the node in clear"
        )
        for route in found.competing:
            if route not in self._competing_reported:
                self.log.warning("competing_route", route=route, strict=self.datapath.strict_mode)
                self.recorder.record(
                    "Warning",
                    "CompetingRoute",
                    f"route {route} would take pod traffic past {self.datapath.device}; {how}",
                    involved=own_object,
                )
        self._competing_reported = set(found.competing)

    def _log_plan(self, plan: reconcile.Plan) -> None:
        for p in plan.add:
            self.log.info("peer_added", peer=p.node, endpoint=str(p.endpoint))
            self.recorder.record("Normal", "PeerAdded", f"peer {p.node} added", node=p.node)
        for r in plan.rename:
            self.log.info("peer_key_changed", peer=r.peer.node, public_key=r.peer.public_key)
            self.recorder.record(
                "Normal",
                "PeerKeyChanged",
                f"peer {r.peer.node} rotated its key to {r.peer.public_key}",
                node=r.peer.node,
            )
        for u in plan.update:
            self.log.info("peer_updated", peer=u.peer.node, endpoint=str(u.peer.endpoint))
        for key in plan.remove:
            self.log.info("peer_removed", public_key=key)
            self.recorder.record("Normal", "PeerRemoved", f"peer {key} removed")

    def _report_refusals(self, refusals: tuple[reconcile.Refusal, ...]) -> None:
        """An Event (and a log line) once per new refusal; the status condition while it lasts."""
        current = {(r.node, r.reason) for r in refusals}
        for r in refusals:
            if (r.node, r.reason) in self._reported:
                continue
            self.log.warning("peer_refused", peer=r.node, reason=r.reason, message=r.message)
            involved = self.watches.wgnode(r.node) or self.watches.node(r.node)
            self.recorder.record("Warning", r.reason, r.message, node=r.node, involved=involved)
        self._reported = current

    def health(self) -> component.Health:
        out = self.outcome
        if out.last_error:
            return component.degraded(f"last pass failed: {out.last_error}")
        if not out.programmed:
            return component.degraded("waiting for the watches to sync")
        return component.ok(f"{len(out.peers)} peers programmed, {len(out.refusals)} refused")
