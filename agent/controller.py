"""The control loop: what runs, in what order, when.

One thread, so the device sees one writer: every second, and at once after a watch event (a
burst of them makes one pass), it asks the watchdog whether the device is still there, puts a
rotated key on the device if that failed, publishes the node's key if that has not got through
(or puts back a spec someone else changed), runs a reconcile pass when one is due (an event, a
device brought back, the resync period) and writes the status; between passes it has the
reconciler guard the backstop and rules every GUARD_INTERVAL, so an idle node repairs them too.
A failed pass is retried with a backoff that doubles up to BACKOFF_MAX; a device brought back
resets it.

Time comes from the clock it is given, so the unit tests drive `step` by hand with a fake clock.
"""

from __future__ import annotations

import threading
from typing import Final

from podwire.agent import clock as clock_mod
from podwire.agent import (
    component,
    events,
    failpoint,
    keystore,
    log,
    publisher,
    reconciler,
    watchdog,
    wgdevice,
)
from podwire.agent.datapath import component as datapath_mod
from podwire.api import wgnode

CHECK_INTERVAL: Final = 1.0  # how often the device is checked, and a pending pass looked at
DEBOUNCE: Final = 0.05  # a burst of watch events (a relist of 5,000 objects) makes one pass
GUARD_INTERVAL: Final = 10.0  # between passes, the backstop and rules are checked this often
BACKOFF_MIN: Final = 1.0
BACKOFF_MAX: Final = 16.0
# After a rotation, the device is read every turn for this long, counting the peers that have
# handshaken with the new key (status.peersOnCurrentKey), or until all have.
CONFIRM_PERIOD: Final = 180.0
# A rotation request stamped further than this in the future is refused (a clock far off, or
# a typo), not honoured on every start until that time comes.
REQUEST_FUTURE_LIMIT: Final = 300.0
# An uninstall request (the chart's pre-delete hook) arms the agent for this long: a request
# left behind by an uninstall that was abandoned must not, days later, make a plain restart
# cut the node's pod traffic.
UNINSTALL_MAX_AGE: Final = 600.0


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` failed passes in a row (1 or more)."""
    return min(BACKOFF_MIN * 2.0 ** max(failures - 1, 0), BACKOFF_MAX)


class Controller:
    name = "controller"

    def __init__(
        self,
        *,
        resync_period: float,
        keys: keystore.KeyStore,
        datapath: datapath_mod.Datapath,
        reconciler: reconciler.Reconciler,
        publisher: publisher.Publisher,
        watchdog: watchdog.Watchdog,
        recorder: events.Recorder,
        clock: clock_mod.Clock,
        wakeup: threading.Event,
    ) -> None:
        self.resync_period = resync_period
        self.keys = keys
        self.datapath = datapath
        self.reconciler = reconciler
        self.publisher = publisher
        self.watchdog = watchdog
        self.recorder = recorder
        self.clock = clock
        self.log = log.get("controller")
        self._lock = threading.Lock()  # one writer to the device: the loop, or a rotation
        self._wake = wakeup  # set by the watches on every change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = True  # a pass is owed
        self._retry_at = 0.0  # no pass before this (monotonic), after a failure
        self._next_resync = 0.0
        self._next_guard = 0.0
        self._unapplied = ""  # why the stored key is not on the device yet, after a rotation
        self._rotating = False  # a rotation not complete (stored, not yet published)
        self._resumed = False  # ... and it was cut short by a restart
        self._handled_request = ""  # the last rotation annotation acted on (or refused)
        self._confirm_since = 0.0  # wall time the current key went on the device
        self._confirm_until = 0.0  # monotonic; 0: not counting
        self.rotations_done = 0
        self.turn_errors = 0  # turns that raised: each is a bug, logged with its traceback
        self.rotations_failed = 0
        self.uninstall_armed = False  # on stop, the agent removes what it made on the node

    def wake(self) -> None:
        """Something changed (a watch event): a pass is owed."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def run(self) -> None:
        woke = True
        while not self._stop.is_set():
            try:
                self.step(woke=woke)
            except Exception as e:  # a bug must not end the loop: log it, owe a pass, go on
                self.turn_errors += 1
                self._pending = True
                self.log.exception("turn_failed", error=str(e))
            woke = self._wake.wait(timeout=CHECK_INTERVAL)
            if woke:
                self._stop.wait(DEBOUNCE)
                self._wake.clear()

    def step(self, *, woke: bool) -> bool:
        """One turn of the loop; True when a reconcile pass ran."""
        with self._lock:
            if self.watchdog.check():  # a new device: the next pass owes nothing to old failures
                self.reconciler.outcome.failures_in_a_row = 0
                self._retry_at, woke = 0.0, True
            before = (self.publisher.published, self.publisher.repairs)
            self._keep_key()
            self._rotate_if_requested()
            self._arm_for_uninstall()
            self._count_confirmed()
            now = self.clock.monotonic()
            self._pending = self._pending or woke or now >= self._next_resync
            if not self._pending or now < self._retry_at:
                changed = (self.publisher.published, self.publisher.repairs) != before
                if self.reconciler.guarded and now >= self._next_guard:
                    self._next_guard = now + GUARD_INTERVAL
                    competing = self.reconciler.outcome.competing_routes
                    self.reconciler.guard(now)
                    changed = changed or self.reconciler.outcome.competing_routes != competing
                if changed:
                    self.publisher.write_status()  # say so now, not at the resync
                return False
            self._next_guard = now + GUARD_INTERVAL  # a pass guards too
            if self.reconciler.reconcile_once():
                self._pending, self._retry_at = False, 0.0
                self._next_resync = now + self.resync_period
            else:
                failures = self.reconciler.outcome.failures_in_a_row
                self._retry_at = now + backoff(failures)
            self.publisher.write_status()
            return True

    def _keep_key(self) -> None:
        """The stored key goes on the device first and is published after, so peers never get
        a key the device does not hold; a rotation whose device step failed is finished here
        on a later turn.

        podwire-engine keeps its sessions and answers for its previous key meanwhile, so its
        peers lose nothing. The kernel stops sending on its sessions when its key changes: its
        packets wait (staged) for the handshake with the new key, which succeeds once a peer
        has learnt the key from its watch and greeted back. Publishing first instead was
        measured worse in the kernel tier: peers that cannot rename (the kernel, wireguard-go)
        drop the old session as soon as they see the key, so the node's packets were lost
        until its own device switched.
        """
        if self.keys.interrupted and not self._rotating:
            # The last agent stopped mid-rotation; the device got the stored key at start.
            self._rotating = self._resumed = True
            self.log.info("key_rotation_resumed", public_key=self.keys.public_key)
        if self._unapplied:
            try:
                self.datapath.apply_keys()  # every lane's device, then one publish
            except Exception as e:  # no device, or its UAPI refused: the next turn tries again
                self._unapplied = f"the new key is not on the device yet: {e}"
                return
            self._unapplied = ""
            failpoint.reached("rotation-applied")
            self._key_applied()
        was = self.publisher.published
        self.publisher.keep()
        if self._rotating and self.publisher.published:
            if not was:
                failpoint.reached("rotation-published")
            self._finish_rotation()

    def _key_applied(self) -> None:
        """The device holds the new key: every peer is greeted, so each handshakes with it now
        (the kernel's sessions stop sending; podwire-engine's carry on until it is done)."""
        self._confirm_since = self.clock.wall()
        self._confirm_until = self.clock.monotonic() + CONFIRM_PERIOD
        self.publisher.peers_on_current_key = 0
        self.publisher.write_status()
        try:
            for _, backend in self.datapath.backends():
                keys = [p.public_key for p in backend.read().peers]
                for request in wgdevice.greeting(keys):
                    backend.apply(request)
        except Exception as e:  # the handshakes still come, with the next packet
            self.log.warning("greeting_failed", error=str(e))

    def _finish_rotation(self) -> None:
        try:
            self.keys.finish()
        except Exception as e:  # the previous key stays on disk; the rotation itself is done
            self.log.warning("previous_key_not_removed", error=str(e))
        self._rotating = False
        self.rotations_done += 1
        how = "resumed after a restart and finished" if self._resumed else "done"
        self._resumed = False
        public = self.keys.public_key
        self.log.info("key_rotated", public_key=public, how=how)
        own = self.publisher.watches.wgnode(self.publisher.node_name)
        self.recorder.record(
            "Normal", "KeyRotated", f"new public key {public} ({how})", involved=own
        )
        if not self._confirm_until:  # resumed: the device got the key at start
            self._confirm_since = self.keys.made_wall
            self._confirm_until = self.clock.monotonic() + CONFIRM_PERIOD

    def _count_confirmed(self) -> None:
        """While confirming a rotation: how many peers have handshaken with the new key."""
        if not self._confirm_until:
            return
        try:
            peers = self.datapath.require().read().peers
        except Exception as e:
            self.log.warning("device_read_failed", error=str(e))
            return
        done = sum(
            1 for p in peers if p.last_handshake and p.last_handshake >= self._confirm_since - 1
        )
        if done != self.publisher.peers_on_current_key:
            self.publisher.peers_on_current_key = done
            self.publisher.write_status()
        if done >= len(peers) or self.clock.monotonic() >= self._confirm_until:
            self._confirm_until = 0.0

    def _requested_rotation(self) -> str:
        """The rotation annotation on the node's own WireguardNode, when it asks for a rotation
        not yet made; a bad one is reported once and ignored."""
        own = self.publisher.watches.wgnode(self.publisher.node_name)
        if own is None:
            return ""
        value = (own.get("metadata", {}).get("annotations") or {}).get(wgnode.ROTATE_ANNOTATION)
        text = str(value) if value else ""
        if not text or text == self._handled_request:
            return ""
        try:
            when = wgnode.parse_time(text)
        except ValueError as e:
            self._handled_request = text
            self.recorder.record(
                "Warning", "KeyRotationRefused", f"{wgnode.ROTATE_ANNOTATION}: {e}", involved=own
            )
            return ""
        if when <= self.keys.made_wall:
            self._handled_request = text  # the key in use is newer: nothing to do
            return ""
        if when > self.clock.wall() + REQUEST_FUTURE_LIMIT:
            self._handled_request = text
            self.recorder.record(
                "Warning",
                "KeyRotationRefused",
                f"{wgnode.ROTATE_ANNOTATION} is {text}, more than {REQUEST_FUTURE_LIMIT:.0f} s "
                "in the future: is a clock wrong?",
                involved=own,
            )
            return ""
        return text

    def _arm_for_uninstall(self) -> None:
        """Armed while the own WireguardNode carries a recent uninstall request; the change
        either way is logged, recorded as an Event and written as the UninstallArmed
        condition (the pre-delete hook waits for it)."""
        own = self.publisher.watches.wgnode(self.publisher.node_name)
        if own is None:
            return
        annotations = own.get("metadata", {}).get("annotations") or {}
        text = str(annotations.get(wgnode.UNINSTALL_ANNOTATION) or "")
        armed, why = self._uninstall_verdict(text)
        written = self.publisher.uninstall
        if written is None and not armed and not text:
            return  # never asked: no condition
        if written is not None and (armed, why) == (written[0], written[2]):
            return
        changed = armed != self.uninstall_armed
        self.uninstall_armed = armed
        self.publisher.uninstall = (armed, "Armed" if armed else "NotArmed", why)
        if changed:
            self.log.info("uninstall_armed" if armed else "uninstall_disarmed", reason=why)
            self.recorder.record(
                "Normal", "UninstallArmed" if armed else "UninstallDisarmed", why, involved=own
            )
        self.publisher.write_status()

    def _uninstall_verdict(self, text: str) -> tuple[bool, str]:
        """Whether the request `text` arms the agent now, and why (or why not)."""
        if not text:
            return False, f"{wgnode.UNINSTALL_ANNOTATION} is not set"
        try:
            when = wgnode.parse_time(text)
        except ValueError as e:
            return False, f"{wgnode.UNINSTALL_ANNOTATION}: {e}"
        now = self.clock.wall()
        if when > now + REQUEST_FUTURE_LIMIT:
            return False, (
                f"{wgnode.UNINSTALL_ANNOTATION} is {text}, more than "
                f"{REQUEST_FUTURE_LIMIT:.0f} s in the future: is a clock wrong?"
            )
        if when < now - UNINSTALL_MAX_AGE:
            return False, (
                f"{wgnode.UNINSTALL_ANNOTATION} is {text}, older than "
                f"{UNINSTALL_MAX_AGE:.0f} s: a stop leaves the node as it is"
            )
        return True, (
            f"uninstall requested at {text}: when the agent stops, it removes its devices, "
            "routes, backstops and rules from the node (the key folder stays)"
        )

    def _rotate_if_requested(self) -> None:
        request = self._requested_rotation()
        if not request:
            return
        self._handled_request = request
        try:
            self._rotate(
                reason=f"requested by {wgnode.ROTATE_ANNOTATION}={request}",
                not_before=wgnode.parse_time(request),
            )
        except Exception as e:  # reported by _rotate; the loop goes on with the old key
            self.log.warning("rotation_not_complete", error=str(e))

    def rotate_key(self) -> tuple[str, float]:
        """A new keypair: stored atomically, put on the device and published in the
        datapath's order (see _keep_key).

        Peers follow once they see the new key on their watch. Returns the new public key and
        when it was made; raises if it could not be stored, or not published yet (the loop
        keeps trying).
        """
        with self._lock:
            public, wall = self._rotate(reason="requested over the local API")
        self.wake()
        return public, wall

    def _rotate(self, *, reason: str, not_before: float = 0.0) -> tuple[str, float]:
        """`not_before`: the time a request was made at, by the requester's clock. The key is
        dated no earlier, so one asked for by a clock ahead of ours still counts as its answer
        (the operator compares status.keyRotatedAt with the time it asked at)."""
        if self._rotating:
            raise RuntimeError("a rotation is still under way; try again when it is done")
        wall = max(self.clock.wall(), not_before)
        try:
            key = self.keys.rotate(wall=wall)
        except Exception as e:
            self.rotations_failed += 1
            self.log.error("key_rotation_failed", error=str(e))
            self.recorder.record(
                "Warning",
                "KeyRotationFailed",
                f"the new key was not stored: {e}",
                involved=self.publisher.watches.wgnode(self.publisher.node_name),
            )
            raise
        failpoint.reached("rotation-stored")
        public = key.public_key_b64()
        self.log.info("key_rotation_started", public_key=public, reason=reason)
        self._rotating = True
        self._unapplied = "the new key is not on the device yet"
        self._keep_key()
        if self._rotating:  # the loop keeps trying
            raise RuntimeError(
                self._unapplied
                or f"the new key is stored but not published yet: {self.publisher.last_error}"
            )
        return public, wall

    def health(self) -> component.Health:
        out = self.reconciler.outcome
        if self._unapplied:
            return component.degraded(f"{self._unapplied}; retrying every turn")
        if self._retry_at:
            return component.degraded(
                f"{out.failures_in_a_row} passes failed in a row; retrying with backoff"
            )
        return component.ok(f"{out.passes} passes, {out.errors} failed")
