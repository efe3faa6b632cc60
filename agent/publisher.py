"""The node's own WireguardNode: its spec (the public key and port) and its status.

The spec is what every other node programs, so publishing it is retried until it holds; a
conflict (409) is retried against the object as it is now. It is the node's own word, so it is
kept: a spec someone else changed (or an object someone deleted) is put back and reported, with
a Warning Event on the object, a log line and `repairs`, which /metrics exports. The status is what an operator reads
in `kubectl get wgnodes`: the endpoint and pod CIDRs in use, the datapath and its features, the
peers, when the key was rotated, the advisories (the node's kernel settings that cost WireGuard
throughput, surveyed again each resync period), and the conditions declared in `wgnode`. It is
written when it changed, never for its own sake, so thousands of agents do not load the
apiserver for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from podwire.agent import clock as clock_mod
from podwire.agent import (
    component,
    events,
    keystore,
    log,
    reconcile,
    reconciler,
    watches,
    wgdevice,
)
from podwire.agent.datapath import component as datapath_mod
from podwire.api import wgnode

Obj = dict[str, Any]

PUBLISH_RETRIES = 5


class WgnodeApi(Protocol):
    """What the publisher asks of the apiserver (kube.Client in the cluster)."""

    def get_node(self, name: str) -> Obj | None: ...
    def get_wgnode(self, name: str) -> Obj | None: ...
    def create_wgnode(self, body: Obj) -> Obj: ...
    def replace_wgnode(self, body: Obj) -> Obj: ...
    def patch_wgnode_status(self, name: str, patch: Obj) -> Obj: ...


# A watch outage shorter than this (an apiserver restart, with the watches' backoff after it)
# is not written into the status; one that lasts longer is.
QUIET_WATCH_OUTAGE = 120.0


class Publisher:
    name = "publisher"

    def __init__(
        self,
        *,
        node_name: str,
        listen_port: int,
        api: WgnodeApi,
        api_error: type[Exception],
        keys: keystore.KeyStore,
        watches: watches.Watches,
        datapath: datapath_mod.Datapath,
        reconciler: reconciler.Reconciler,
        clock: clock_mod.Clock,
        recorder: events.Recorder | None = None,
    ) -> None:
        self.node_name = node_name
        self.listen_port = listen_port
        self.api = api
        self.api_error = api_error  # what api raises; its `status` is the HTTP status
        self.keys = keys
        self.watches = watches
        self.datapath = datapath
        self.reconciler = reconciler
        self.clock = clock
        self.recorder = recorder
        # The agent's readiness, which the Ready condition reports: set once the agent is
        # assembled (`app.assemble`); until then, KeyPublished and PeersProgrammed.
        self.readiness: Callable[[], tuple[bool, str]] | None = None
        self.published_key = ""  # the key the WireguardNode's spec holds, as far as we know
        self.published_lanes: tuple[wgnode.Lane, ...] = ()  # ... and its lanes 1..N-1
        self.last_error = ""
        self.repairs = 0  # times the spec was found changed by someone else and put back
        self._checked_version = ""  # the own object's resourceVersion last found wrong, then read
        self._status_sent: Obj | None = None
        # Set by the controller once a rotation's key is on the device: how many peers have
        # handshaken with it since (status.peersOnCurrentKey); None before any rotation.
        self.peers_on_current_key: int | None = None
        # Set by the controller once an uninstall was requested: UninstallArmed's status
        # (armed or not), reason and message; None: the condition is not written.
        self.uninstall: tuple[bool, str, str] | None = None
        self._unsynced_since = 0.0  # monotonic: since when the watches have not been synced
        self._next_survey = 0.0  # monotonic; the device surveyed itself when it came up
        self.log = log.get("publisher", node=node_name)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    @property
    def published(self) -> bool:
        return (
            bool(self.published_key)
            and self.published_key == self.keys.public_key
            and self.published_lanes == self.datapath.lane_specs()
        )

    def keep(self) -> None:
        """Every turn of the loop: publishes the key until it got through, then keeps it.

        The watch shows the object as it is; one whose spec differs (or that is gone) is read
        again, since the watch may just lag behind our own write, and put back if it still
        differs. A version found wrong is read once, not on every turn.
        """
        if not self.published:
            self.publish()
            return
        own = self.watches.wgnode(self.node_name)
        if own is not None and _spec_holds(own, self._spec()):
            return
        version = "" if own is None else str(own.get("metadata", {}).get("resourceVersion", ""))
        if version and version == self._checked_version:
            return
        self._checked_version = version
        self.publish(repair=True)

    def _spec(self) -> wgnode.Spec:
        return wgnode.Spec(
            public_key=self.keys.public_key,
            listen_port=self.listen_port,
            lanes=self.datapath.lane_specs(),
        )

    def publish(self, *, repair: bool = False) -> bool:
        """Creates or updates the spec; False (and last_error) when it did not get through.

        With repair, the key was published before: a spec found different was changed by
        someone else, and putting it back is reported.
        """
        spec = self._spec()
        try:
            self._publish(spec, repair=repair)
        except self.api_error as e:
            self.last_error = str(e)
            self.log.warning("publish_failed", error=str(e))
            return False
        self.last_error = ""
        self.published_key, self.published_lanes = spec.public_key, spec.lanes
        return True

    def _publish(self, spec: wgnode.Spec, *, repair: bool = False) -> None:
        name = self.node_name
        for _ in range(PUBLISH_RETRIES):
            node = self.api.get_node(name)
            if node is None:
                raise self.api_error(f"Node {name} does not exist: is NODE_NAME right?")
            current = self.api.get_wgnode(name)
            want = wgnode.new(
                name,
                node["metadata"]["uid"],
                spec.public_key,
                listen_port=spec.listen_port,
                lanes=spec.lanes,
            )
            try:
                if current is None:
                    made = self.api.create_wgnode(want.to_dict())
                    self.log.info("wireguardnode_created")
                    if repair:
                        self._repaired(made, "the WireguardNode was deleted; created again")
                    return
                if _spec_holds(current, want.spec):
                    return  # a restart changes nothing
                put = self.api.replace_wgnode({**current, "spec": want.spec.to_dict()})
                self.log.info("wireguardnode_updated")
                if repair:
                    self._repaired(put, _changes(current, want.spec))
                return
            except self.api_error as e:
                if getattr(e, "status", None) != 409:
                    raise
                self.log.info("wireguardnode_conflict_retry")
        raise self.api_error(
            f"WireguardNode {name}: still conflicting after {PUBLISH_RETRIES} tries"
        )

    def _repaired(self, obj: Obj, what: str) -> None:
        self.repairs += 1
        message = f"{what}: this node's agent keeps its own key and port"
        self.log.warning("wireguardnode_repaired", change=what, repairs=self.repairs)
        if self.recorder is not None:
            self.recorder.record(
                "Warning", "SpecRepaired", message, node=self.node_name, involved=obj
            )

    def write_status(self) -> None:
        """Patches the status if it changed since the last write; failures are retried next pass.

        Not while the watches have been down for less than QUIET_WATCH_OUTAGE: every agent
        writing "not Ready" the moment a recovering apiserver answers (then "Ready" once its
        watches relist) is a herd of writes into it and churn for nothing. /readyz and
        `podwire status` say it at once; a watch down for longer (the apiserver answers, the
        watch does not) is reported in the status too.
        """
        self._survey_at_resync()
        now = self.clock.monotonic()
        if self.watches.synced:
            self._unsynced_since = 0.0
        else:
            self._unsynced_since = self._unsynced_since or now
            if now - self._unsynced_since < QUIET_WATCH_OUTAGE:
                return
        own = self.watches.wgnode(self.node_name)
        if own is None:
            return
        body = self.status(own).to_dict()
        if body == self._status_sent:
            return
        try:
            self.api.patch_wgnode_status(self.node_name, {"status": body})
            self._status_sent = body
        except self.api_error as e:
            self.log.warning("status_update_failed", error=str(e))

    def _survey_at_resync(self) -> None:
        """The node's settings are read again once per resync period, not on every pass: they
        change by an operator's hand (a reboot, ethtool), and each read costs syscalls."""
        if self.datapath.backend is None:
            return
        now = self.clock.monotonic()
        if self._next_survey and now < self._next_survey:
            return
        if self._next_survey:
            self.datapath.survey()
        self._next_survey = now + self.reconciler.resync_period

    def current_conditions(self) -> tuple[wgnode.Condition, ...]:
        """The conditions as the status would carry them now (for the local API)."""
        own = self.watches.wgnode(self.node_name)
        return self.status(own).conditions if own else self.conditions(())

    def status(self, own: Obj) -> wgnode.Status:
        try:
            parsed: wgnode.WireguardNode | None = wgnode.WireguardNode.from_dict(own)
        except wgnode.ResourceError:
            parsed = None
        old = parsed.status if parsed and parsed.status else wgnode.Status()
        node = self.watches.node(self.node_name) or {}
        addresses = reconcile.internal_ips(node)
        made = self.keys.made_wall
        peers = len(self.reconciler.outcome.peers)
        on_current = self.peers_on_current_key
        return wgnode.Status(
            endpoint=str(wgdevice.make_endpoint(addresses[0], self.listen_port))
            if addresses
            else None,
            pod_cidrs=tuple(str(c) for c in node.get("spec", {}).get("podCIDRs", [])),
            conditions=self.conditions(old.conditions),
            datapath=self.datapath.kind if self.datapath.kind in wgnode.DATAPATHS else None,  # type: ignore[arg-type]
            features=self.datapath.features,
            advisories=tuple(wgnode.Advisory(a.name, a.message) for a in self.datapath.advisories),
            peers=peers,
            key_rotated_at=wgnode.format_time(made) if made else old.key_rotated_at,
            peers_on_current_key=peers if on_current is None else min(on_current, peers),
            observed_generation=own.get("metadata", {}).get("generation"),
            lanes=self.datapath.lane_count,
        )

    def conditions(self, old: tuple[wgnode.Condition, ...]) -> tuple[wgnode.Condition, ...]:
        """Every condition `wgnode` declares, from what the components know now."""
        now = wgnode.format_time(self.clock.wall())
        out = self.reconciler.outcome
        conds = old

        def put(type: str, ok: bool, reason: str, message: str = "") -> None:
            nonlocal conds
            conds = wgnode.set_condition(
                conds, type, "True" if ok else "False", reason, message=message, now=now
            )

        published = self.published
        put(
            wgnode.KEY_PUBLISHED,
            published,
            "KeyPublished" if published else "PublishPending",
            self.mismatch() if not published else self.last_error,
        )
        programmed = out.programmed and not out.last_error
        put(
            wgnode.PEERS_PROGRAMMED,
            programmed,
            "Programmed"
            if programmed
            else ("ReconcileFailed" if out.last_error else "WaitingForSync"),
            out.last_error or f"{len(out.peers)} peers",
        )
        refused = sorted({r.node for r in out.refusals})
        put(
            wgnode.PEERS_REFUSED,
            bool(refused),
            "Refused" if refused else "NoneRefused",
            ("refused: " + ", ".join(refused)) if refused else "",
        )
        encrypted, reason, message = self._encrypted()
        put(wgnode.ENCRYPTED, encrypted, reason, message)
        ready, why = self.readiness() if self.readiness else (published and programmed, "")
        put(wgnode.READY, ready, "Ready" if ready else "NotReady", "" if ready else why)
        if self.uninstall is not None:
            put(wgnode.UNINSTALL_ARMED, *self.uninstall)
        return conds

    def _encrypted(self) -> tuple[bool, str, str]:
        dp = self.datapath
        if not dp.fail_closed_installed:
            return False, "FailClosedOff", "pod traffic to a node without a peer may leave in clear"
        competing = self.reconciler.outcome.competing_routes
        if competing and not dp.strict_mode:
            return False, "CompetingRoute", "pod traffic leaves in clear by " + "; ".join(competing)
        if dp.backend is None:
            return True, "FailClosed", "no device yet: pod traffic to other nodes is dropped"
        if competing:
            return (
                True,
                "CompetingRouteOverridden",
                ("strictMode keeps pod traffic in the tunnel despite " + "; ".join(competing)),
            )
        through = dp.device if dp.lane_count == 1 else ", ".join(dp.devices)
        return True, "Encrypted", f"through {through}; pod traffic without a peer is dropped"

    def mismatch(self) -> str:
        """Why the key in use is not the published one, while it is not (public keys only)."""
        why = f": {self.last_error}" if self.last_error else ""
        if not self.published_key:
            if self.last_error:
                return f"publishing the WireguardNode: {self.last_error}"
            return "the WireguardNode is not published yet"
        return (
            f"the device's key {self.keys.public_key} is not published yet; the WireguardNode "
            f"still has {self.published_key}{why}"
        )

    def health(self) -> component.Health:
        if not self.published:
            return component.degraded(self.mismatch())
        if self.last_error:
            return component.degraded(f"publishing the WireguardNode: {self.last_error}")
        return component.ok(f"WireguardNode {self.node_name} published")


def _changes(current: Obj, spec: wgnode.Spec) -> str:
    """What someone else changed, as `field: theirs, put back to ours` (public keys only)."""
    have = current.get("spec", {})
    ours = spec.to_dict()
    out = [
        f"spec.{field} was {have.get(field)!r}, put back to {ours.get(field)!r}"
        for field in ("publicKey", "listenPort", "lanes")
        if have.get(field) != ours.get(field)
    ]
    return "; ".join(out) or "the spec was changed"


def _spec_holds(current: Obj, spec: wgnode.Spec) -> bool:
    have = current.get("spec", {})
    want = spec.to_dict()
    return bool(
        have.get("publicKey") == want["publicKey"]
        and have.get("listenPort") == want["listenPort"]
        and (have.get("lanes") or []) == want.get("lanes", [])
    )
