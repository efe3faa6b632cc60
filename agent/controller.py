"""The agent's control loop: publish the node's key, then keep the device equal to the cluster.

Level-triggered: the informers only say that something changed; each pass computes the whole
desired state (Nodes and WireguardNodes) and diffs it against the device's actual peers and
routes. The device is read back in full at start, every resync period, after any failure and
whenever it was replaced; in between the agent diffs against its own record of what it read
and wrote (reconcile.PeerTable), so one change at 5,000 nodes costs one change, not a read of
5,000 peers and routes. Nothing is removed until both watches have listed, and nothing while
the apiserver is away, so the device keeps its last good state.

A device that vanishes (the engine died, someone deleted the link) is noticed within a second
and brought back: the engine restarted, the key and port set, every peer and route programmed
again. Meanwhile the fail-closed routes drop the traffic that has lost its tunnel.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from podwire.agent import clock as clock_mod
from podwire.agent import config as config_mod
from podwire.agent import datapath, keys, kube, log, reconcile
from podwire.api import wgnode

Obj = dict[str, Any]

PUBLISH_RETRIES = 5
DEBOUNCE = 0.05  # a burst of watch events (a relist of 5,000 objects) makes one pass
DEVICE_CHECK_INTERVAL = 1.0  # how often the agent asks whether its device is still there


@dataclasses.dataclass
class State:
    """What the agent knows about itself: read by the API, /readyz and /metrics."""

    node: str
    public_key: str = ""
    datapath: str = ""
    features: tuple[str, ...] = ()
    nodes_synced: bool = False
    wgnodes_synced: bool = False
    programmed: bool = False  # the device holds what synced watches asked for
    last_reconcile_wall: float = 0.0
    last_reconcile_error: str = ""
    reconciles: int = 0
    reconcile_errors: int = 0
    last_reconcile_seconds: float = 0.0
    peers: tuple[reconcile.DesiredPeer, ...] = ()
    refusals: tuple[reconcile.Refusal, ...] = ()
    watch_restarts: int = 0
    key_rotated_wall: float = 0.0
    device_restarts: int = 0  # times the device was found gone or replaced and brought back


class Controller:
    def __init__(
        self,
        cfg: config_mod.Config,
        *,
        client: kube.Client,
        backend: datapath.Backend,
        routes: datapath.Routes | None,
        clock: clock_mod.Clock | None = None,
        on_event: Callable[[str, str, str, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.backend = backend
        self.routes = routes
        self.clock = clock or clock_mod.MonotonicClock()
        self.log = log.get("controller", node=cfg.node_name)
        self.state = State(node=cfg.node_name, datapath=backend.datapath)
        self._on_event = on_event or (lambda *_: None)
        self._wake = threading.Event()
        self._rotate_lock = threading.Lock()
        self._stop = threading.Event()
        self._reported: set[tuple[str, str]] = set()
        self._status_sent: Obj | None = None
        self.key: keys.PrivateKey | None = None
        # The device as last read back or written; None: read it back on the next pass.
        self._table: reconcile.PeerTable | None = None
        self._routes_have: set[reconcile.IPNetwork] | None = None
        self._device_id: object | None = None
        self._next_full_read = 0.0
        # A device found empty is new (first start, or restored): its peers are greeted, so
        # they drop the sessions they had with its predecessor now, not 15 s from now.
        self._greet = False
        self.nodes = kube.Informer(
            client, "nodes", on_change=self._wake.set, resync_period=cfg.resync_period
        )
        self.wgnodes = kube.Informer(
            client, "wgnodes", on_change=self._wake.set, resync_period=cfg.resync_period
        )

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        """Fail closed, bring the device up with the node's key, publish it, start watching."""
        if self.cfg.fail_closed and self.routes is not None:
            # First of all: pod traffic with no programmed peer is dropped, never sent in clear.
            self.routes.install_fail_closed(self.cfg.cluster_pod_cidrs)
        self.key = keys.load_or_create(self.cfg.key_path)
        self.state.public_key = self.key.public_key_b64()
        self._bring_up_device()
        self.log.info(
            "device_ready", datapath=self.backend.datapath, public_key=self.state.public_key
        )
        self.nodes.start()
        self.wgnodes.start()

    def _bring_up_device(self) -> None:
        """The device exists, with the node's key and port; its peers are read back next pass."""
        assert self.key is not None
        with self._rotate_lock:
            self.backend.ensure_device()
            self.backend.set_private_key(self.key.raw)
            self.backend.set_listen_port(self.cfg.listen_port)
        self.state.features = tuple(self.backend.features())
        self._device_id = self.backend.identity()
        self._forget_device()

    def _forget_device(self) -> None:
        self._table = None
        self._routes_have = None

    def check_device(self) -> bool:
        """Brings the device back if it is gone or was replaced; True if it had to."""
        current = self.backend.identity()
        if current is not None and current == self._device_id:
            return False
        self.state.device_restarts += 1
        self.log.warning("device_lost", device=self.cfg.device, replaced=current is not None)
        self._on_event("Warning", "DeviceLost", f"device {self.cfg.device} was gone; restoring", "")
        try:
            self._bring_up_device()
            self.log.info("device_restored", device=self.cfg.device)
        except Exception as e:  # retried every DEVICE_CHECK_INTERVAL
            self._forget_device()
            self.state.last_reconcile_error = f"bring the device back: {e}"
            self.log.error("device_restore_failed", error=str(e))
        return True

    def publish(self) -> None:
        """Create or update the node's own WireguardNode (spec); 409s are retried fresh."""
        assert self.key is not None
        name = self.cfg.node_name
        for _ in range(PUBLISH_RETRIES):
            node = self.client.get_node(name)
            if node is None:
                raise kube.KubeError(f"Node {name} does not exist: is NODE_NAME right?", status=404)
            current = self.client.get_wgnode(name)
            want = wgnode.new(
                name,
                node["metadata"]["uid"],
                self.state.public_key,
                listen_port=self.cfg.listen_port,
            )
            try:
                if current is None:
                    self.client.create_wgnode(want.to_dict())
                    self.log.info("wireguardnode_created")
                    return
                have = current.get("spec", {})
                if (
                    have.get("publicKey") == want.spec.public_key
                    and have.get("listenPort") == want.spec.listen_port
                ):
                    return  # a restart changes nothing
                body = dict(current)
                body["spec"] = want.spec.to_dict()
                self.client.replace_wgnode(body)
                self.log.info("wireguardnode_updated")
                return
            except kube.KubeError as e:
                if e.status != 409:
                    raise
                self.log.info("wireguardnode_conflict_retry")
        raise kube.KubeError(
            f"WireguardNode {name}: still conflicting after {PUBLISH_RETRIES} tries", status=409
        )

    def rotate_key(self) -> tuple[str, float]:
        """A new keypair: written atomically, put on the device, then published.

        Peers follow once they see the new key on their watch; the rotation issue makes this
        hitless. Returns the new public key and when it was made.
        """
        with self._rotate_lock:
            self.key = keys.rotate(self.cfg.key_path)
            self.backend.set_private_key(self.key.raw)
            self.state.public_key = self.key.public_key_b64()
            self.state.key_rotated_wall = self.clock.wall()
            self.log.info("key_rotated", public_key=self.state.public_key)
            self._on_event("Normal", "KeyRotated", f"new public key {self.state.public_key}", "")
            self.publish()
            self._wake.set()
            return self.state.public_key, self.state.key_rotated_wall

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Reconciles on every change, when the device was lost, and every resync period."""
        published = False
        while not self._stop.is_set():
            if not published:
                try:
                    self.publish()
                    published = True
                except kube.KubeError as e:
                    self.log.warning("publish_failed", error=str(e))
            woke = self._wake.wait(timeout=DEVICE_CHECK_INTERVAL)
            if self._stop.is_set():
                break
            lost = self.check_device()
            due = time.monotonic() >= self._next_full_read
            if not (woke or lost or due):
                continue
            if woke:
                self._stop.wait(DEBOUNCE)
            self._wake.clear()
            self.reconcile_once()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.nodes.stop()
        self.wgnodes.stop()

    def reconcile_once(self) -> None:
        """One pass; the device is read back in full if due, else diffed against the record."""
        started = time.monotonic()
        st = self.state
        st.nodes_synced, st.wgnodes_synced = self.nodes.synced, self.wgnodes.synced
        st.watch_restarts = self.nodes.restarts + self.wgnodes.restarts
        synced = (
            st.nodes_synced
            and st.wgnodes_synced
            and not self.nodes.last_error
            and not self.wgnodes.last_error
        )
        try:
            desired = reconcile.desired_peers(
                self.nodes.snapshot(),
                self.wgnodes.snapshot(),
                self.cfg.node_name,
                own_public_key=st.public_key,
            )
            full = started >= self._next_full_read or self._table is None
            if full:
                self._table = reconcile.PeerTable(self.backend.read_peers())
                self._greet = self._greet or len(self._table) == 0
                self._routes_have = None
                self._next_full_read = started + self.cfg.resync_period
            table = self._table
            assert table is not None
            plan = reconcile.plan_peers(desired.peers, table.peers(), synced=synced)
            if not plan.empty:  # a failed apply forgets the record (below): read back next
                self.backend.apply(plan)
                table.apply(plan)
                self._log_plan(plan)
                if self._greet and plan.add:
                    self.backend.initiate_handshakes([p.public_key for p in plan.add])
            if synced:
                self._greet = False
            if self.routes is not None:
                if self._routes_have is None:
                    self._routes_have = set(self.routes.list_routes())
                have = self._routes_have
                rplan = reconcile.plan_routes(desired.peers, have, synced=synced)
                if not rplan.empty:
                    self.routes.apply(rplan)
                    self._routes_have = (have | set(rplan.add)) - set(rplan.remove)
            st.peers = desired.peers
            st.refusals = desired.refusals
            st.programmed = synced
            st.last_reconcile_error = ""
            self._report_refusals(desired.refusals)
        except Exception as e:  # a pass that fails is retried on the next change or resync
            self._forget_device()
            st.reconcile_errors += 1
            st.last_reconcile_error = str(e)
            self.log.error("reconcile_failed", error=str(e))
            self._wake.set()
            self._stop.wait(1.0)
        finally:
            st.reconciles += 1
            st.last_reconcile_wall = self.clock.wall()
            st.last_reconcile_seconds = time.monotonic() - started
        self._write_status()

    def _log_plan(self, plan: reconcile.Plan) -> None:
        for p in plan.add:
            self.log.info("peer_added", peer=p.node, endpoint=str(p.endpoint))
            self._on_event("Normal", "PeerAdded", f"peer {p.node} added", p.node)
        for u in plan.update:
            self.log.info("peer_updated", peer=u.peer.node, endpoint=str(u.peer.endpoint))
        for key in plan.remove:
            self.log.info("peer_removed", public_key=key)
            self._on_event("Normal", "PeerRemoved", f"peer {key} removed", "")

    def _report_refusals(self, refusals: tuple[reconcile.Refusal, ...]) -> None:
        """An Event (and a log line) once per new refusal; a condition while it lasts."""
        current = {(r.node, r.reason) for r in refusals}
        for r in refusals:
            if (r.node, r.reason) in self._reported:
                continue
            self.log.warning("peer_refused", peer=r.node, reason=r.reason, message=r.message)
            self._on_event("Warning", r.reason, r.message, r.node)
            involved = self.wgnodes.objects.get(r.node) or self.nodes.objects.get(r.node)
            if involved is not None:
                try:
                    self.client.emit_event(
                        involved=involved, reason=r.reason, message=r.message, event_type="Warning"
                    )
                except kube.KubeError as e:
                    self.log.warning("event_failed", error=str(e))
        self._reported = current

    def _write_status(self) -> None:
        own = self.wgnodes.objects.get(self.cfg.node_name)
        if own is None:
            return
        st = self.state
        node = self.nodes.objects.get(self.cfg.node_name, {})
        old = []
        try:
            parsed = wgnode.WireguardNode.from_dict(own)
            old = list(parsed.status.conditions) if parsed.status else []
        except wgnode.ResourceError:
            parsed = None
        now = wgnode.format_time(self.clock.wall())
        conds = tuple(old)
        conds = wgnode.set_condition(conds, wgnode.KEY_PUBLISHED, "True", "KeyPublished", now=now)
        ok = st.programmed and not st.last_reconcile_error
        conds = wgnode.set_condition(
            conds,
            wgnode.PEERS_PROGRAMMED,
            "True" if ok else "False",
            "Programmed"
            if ok
            else ("ReconcileFailed" if st.last_reconcile_error else "WaitingForSync"),
            message=st.last_reconcile_error or f"{len(st.peers)} peers",
            now=now,
        )
        refused = sorted({r.node for r in st.refusals})
        conds = wgnode.set_condition(
            conds,
            "PeersRefused",
            "True" if refused else "False",
            "Refused" if refused else "NoneRefused",
            message=("refused: " + ", ".join(refused)) if refused else "",
            now=now,
        )
        conds = wgnode.set_condition(
            conds, wgnode.READY, "True" if ok else "False", "Ready" if ok else "NotReady", now=now
        )
        addresses = [
            a.get("address")
            for a in node.get("status", {}).get("addresses", [])
            if a.get("type") == "InternalIP"
        ]
        status = wgnode.Status(
            endpoint=str(reconcile.make_endpoint(addresses[0], self.cfg.listen_port))
            if addresses
            else None,
            pod_cidrs=tuple(node.get("spec", {}).get("podCIDRs", [])),
            conditions=conds,
            datapath=st.datapath if st.datapath in wgnode.DATAPATHS else None,  # type: ignore[arg-type]
            features=st.features,
            peers=len(st.peers),
            key_rotated_at=(
                wgnode.format_time(st.key_rotated_wall)
                if st.key_rotated_wall
                else (parsed.status.key_rotated_at if parsed and parsed.status else None)
            ),
            observed_generation=own.get("metadata", {}).get("generation"),
        )
        body = status.to_dict()
        if body == self._status_sent:
            return
        try:
            self.client.patch_wgnode_status(self.cfg.node_name, {"status": body})
            self._status_sent = body
        except kube.KubeError as e:
            self.log.warning("status_update_failed", error=str(e))
