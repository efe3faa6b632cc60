"""The leader's loop: reconcile the cluster's WireguardNodes against the Nodes, level-triggered.

Each pass, on any change the watches see and every resync period anyway, reads the two
informers' copies and does three things, each idempotent: removes WireguardNodes whose Node has
been gone for the grace, sets or clears the Conflict condition, and moves the rolling key
rotation one step (see rotation.py). Only the leader passes; a replica that waits keeps its
watches warm so that it can act at once when it takes over.

The informers see our own writes a moment later; until they do, the objects our writes returned
stand in for their cached copies (client-go's mutation cache), so a pass never starts a rotation
twice or counts one twice.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from podwire.agent import clock as clock_mod
from podwire.agent import component, kube, log
from podwire.api import wgnode
from podwire.operator import conflicts, rotation, stale

Obj = dict[str, Any]

COMPONENT: Final = "podwire-operator"
CONFLICT: Final = "Conflict"
NO_CONFLICT: Final = "NoConflict"
DEBOUNCE: Final = 0.5  # changes that arrive together (status updates of many agents) make one pass
PATCH_RETRIES: Final = 3


@dataclasses.dataclass
class Counts:
    """What /metrics reports of the loop."""

    passes: int = 0
    errors: int = 0
    stale_removed: int = 0
    rotations: Counter[str] = dataclasses.field(default_factory=Counter)
    conflicts: Counter[str] = dataclasses.field(default_factory=Counter)
    queued: int = 0
    last_error: str = ""


class Controller:
    name = "controller"

    def __init__(
        self,
        client: kube.Client,
        *,
        leading: Callable[[], bool],
        nodes: kube.Informer,
        wgnodes: kube.Informer,
        stale_grace: float,
        rotation_deadline: float,
        key_rotation_interval: float,
        resync: float,
        clock: clock_mod.Clock | None = None,
    ) -> None:
        self.client = client
        self.leading = leading
        self.nodes = nodes
        self.wgnodes = wgnodes
        self.rotation_deadline = rotation_deadline
        self.key_rotation_interval = key_rotation_interval
        self.resync = resync
        self.clock = clock or clock_mod.MonotonicClock()
        self.stale = stale.StaleTracker(grace=stale_grace)
        self.counts = Counts()
        self._written: dict[str, Obj] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._log: Any = log.get("operator")

    def changed(self) -> None:
        """The informers' on_change: a pass soon."""
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(stop,), name="controller", daemon=True
        )
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Waits for the loop to end (after stop is set), a write in flight included."""
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> component.Health:
        if not (self.nodes.synced and self.wgnodes.synced):
            return component.degraded("waiting for the Node and WireguardNode lists")
        if self.counts.last_error:
            return component.ok(f"last pass failed: {self.counts.last_error}")
        return component.ok(f"{self.counts.passes} passes")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(self.resync)
            stop.wait(DEBOUNCE)
            self._wake.clear()
            if stop.is_set():
                break
            if not self.leading():
                self.stale.forget()
                self._written.clear()
                continue
            self.pass_once()

    def pass_once(self) -> None:
        if not (self.nodes.synced and self.wgnodes.synced):
            return
        self.counts.passes += 1
        nodes = self.nodes.snapshot()
        failed = []
        # Each duty on its own: one that fails (the apiserver away, an object refused) does not
        # hold up the others; the next pass tries it again.
        for duty in (self._remove_stale, self._flag_conflicts, self._rotate):
            try:
                duty(self._wgnodes(), nodes)
            except Exception as e:
                failed.append(str(e))
                self._log.warning("pass_failed", duty=duty.__name__.lstrip("_"), error=str(e))
        self.counts.errors += bool(failed)
        self.counts.last_error = "; ".join(failed)

    def _wgnodes(self) -> list[Obj]:
        """The informer's copies, each replaced by the object our last write returned while
        that is newer."""
        out: list[Obj] = []
        cached = {o["metadata"]["name"]: o for o in self.wgnodes.snapshot()}
        for name in list(self._written):
            if name not in cached or _version(cached[name]) >= _version(self._written[name]):
                del self._written[name]
        for name, obj in cached.items():
            out.append(self._written.get(name, obj))
        return out

    def _remember(self, obj: Obj) -> None:
        self._written[obj["metadata"]["name"]] = obj

    # -- stale WireguardNodes ------------------------------------------------------------------

    def _remove_stale(self, wgnodes: list[Obj], nodes: list[Obj]) -> None:
        names = self.stale.update(
            (_name(o) for o in wgnodes), (_name(n) for n in nodes), now=self.clock.monotonic()
        )
        for name in names:
            # The copies may lag: believe the apiserver, not them, before deleting anything.
            if not self.leading() or self.client.get_node(name) is not None:
                continue
            obj = self.client.get_wgnode(name)
            if obj is None:
                continue
            self.client.delete_wgnode(name)
            self.counts.stale_removed += 1
            message = f"removed: its Node {name} has been gone for {self.stale.grace:g}s or more"
            self._log.info("stale_wireguardnode_removed", node=name)
            self._event(obj, "StaleRemoved", message)

    # -- conflicts -----------------------------------------------------------------------------

    def _flag_conflicts(self, wgnodes: list[Obj], nodes: list[Obj]) -> None:
        found = conflicts.find(wgnodes, nodes)
        self.counts.conflicts = Counter(c.reason for c in found.values())
        for obj in wgnodes:
            name, now = _name(obj), self.clock.wall()
            have = _condition(obj, CONFLICT)
            conflict = found.get(name)
            if conflict is not None:
                if have is None or (have.status, have.reason, have.message) != (
                    "True",
                    conflict.reason,
                    conflict.message,
                ):
                    self._log.warning(
                        "conflict", node=name, reason=conflict.reason, others=list(conflict.others)
                    )
                    if self._set_condition(
                        name, CONFLICT, "True", conflict.reason, conflict.message, now=now
                    ):
                        self._event(obj, conflict.reason, conflict.message, warning=True)
            elif have is not None and have.status == "True":
                message = "no duplicate public key or overlapping pod CIDR any more"
                if self._set_condition(name, CONFLICT, "False", NO_CONFLICT, message, now=now):
                    self._event(obj, "ConflictResolved", message)

    # -- rotation ------------------------------------------------------------------------------

    def _rotate(self, wgnodes: list[Obj], nodes: list[Obj]) -> None:
        now = self.clock.wall()
        views = [rotation.read(o) for o in wgnodes]
        self.counts.queued = sum(1 for v in views if v.queued_at is not None)
        by_name = {_name(o): o for o in wgnodes}
        for action in rotation.plan(
            views, now=now, deadline=self.rotation_deadline, interval=self.key_rotation_interval
        ):
            if not self.leading():
                return
            say = self._log.warning if action.kind == "timed_out" else self._log.info
            say("rotation_" + action.kind, node=action.name, message=action.message)
            getattr(self, f"_rotation_{action.kind}")(action, by_name[action.name], now)

    def _rotation_queue(self, action: rotation.Action, obj: Obj, now: float) -> None:
        self._annotate(action.name, {rotation.QUEUE_ANNOTATION: wgnode.format_time(now)})
        self.counts.queued += 1

    def _rotation_start(self, action: rotation.Action, obj: Obj, now: float) -> None:
        # Never earlier than the queue mark, or the node would not count as started: the
        # mark may come from a machine whose clock is ahead of ours.
        queued = rotation.read(self._written.get(action.name, obj)).queued_at or 0.0
        at = wgnode.format_time(max(now, math.ceil(queued)))
        self._annotate(action.name, {rotation.REQUEST_ANNOTATION: at})
        message = f"key rotation requested at {at}"
        self._set_condition(action.name, rotation.CONDITION, "Unknown", rotation.IN_PROGRESS, message, now=now)  # fmt: skip
        self._event(obj, "KeyRotationRequested", message)

    def _rotation_done(self, action: rotation.Action, obj: Obj, now: float) -> None:
        self._annotate(action.name, {rotation.QUEUE_ANNOTATION: None})
        self._set_condition(action.name, rotation.CONDITION, "True", rotation.COMPLETED, action.message, now=now)  # fmt: skip
        self.counts.rotations["done"] += 1
        self._event(obj, "KeyRotated", action.message)

    def _rotation_timed_out(self, action: rotation.Action, obj: Obj, now: float) -> None:
        withdrawn = {rotation.REQUEST_ANNOTATION: None} if action.withdraw else {}
        self._annotate(action.name, {rotation.QUEUE_ANNOTATION: None, **withdrawn})
        self._set_condition(action.name, rotation.CONDITION, "False", rotation.DEADLINE, action.message, now=now)  # fmt: skip
        self.counts.rotations["timed_out"] += 1
        self._event(obj, "KeyRotationTimedOut", action.message, warning=True)

    # -- writes --------------------------------------------------------------------------------

    def _annotate(self, name: str, annotations: dict[str, str | None]) -> None:
        written = self.client.patch_wgnode_metadata(name, {"metadata": {"annotations": annotations}})  # fmt: skip
        self._remember(written)

    def _set_condition(
        self,
        name: str,
        type: str,
        status: wgnode.ConditionStatus,
        reason: str,
        message: str,
        *,
        now: float,
    ) -> bool:
        """Sets one condition by a merge patch of the conditions list as read just now, with
        its resourceVersion, so a condition the agent wrote meanwhile is never lost; False if
        the object is gone or malformed."""
        for _ in range(PATCH_RETRIES):
            obj = self.client.get_wgnode(name)
            if obj is None:
                return False
            try:
                have = wgnode.Status.from_dict(obj.get("status") or {}, name=name).conditions
            except wgnode.ResourceError as e:
                self._log.warning("conditions_unreadable", node=name, error=str(e))
                return False
            new = wgnode.set_condition(have, type, status, reason, message=message, now=wgnode.format_time(now))  # fmt: skip
            patch = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {"conditions": [c.to_dict() for c in new]},
            }
            try:
                self._remember(self.client.patch_wgnode_status(name, patch))
                return True
            except kube.KubeError as e:
                if e.status != 409:
                    raise
        self._log.warning("condition_not_set", node=name, condition=type, reason="conflicts")
        return False

    def _event(self, obj: Obj, reason: str, message: str, *, warning: bool = False) -> None:
        try:
            self.client.emit_event(
                involved=obj,
                reason=reason,
                message=message,
                event_type="Warning" if warning else "Normal",
                component=COMPONENT,
            )
        except Exception as e:  # an Event lost is a pity, not a reason to stop the pass
            self._log.warning("event_not_recorded", reason=reason, error=str(e))


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _version(obj: Obj) -> int:
    """The resourceVersion as a number, to tell which of two copies is newer (etcd's revision;
    an opaque string by contract, so anything else counts as old)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion", "0"))
    except ValueError:
        return 0


def _condition(obj: Obj, type: str) -> wgnode.Condition | None:
    for raw in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(raw, dict) and raw.get("type") == type:
            try:
                return wgnode.Condition.from_dict(raw)
            except wgnode.ResourceError:
                return None
    return None
