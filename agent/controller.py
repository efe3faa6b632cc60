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
from podwire.agent import component, events, keystore, log, publisher, reconciler, watchdog
from podwire.agent.datapath import component as datapath_mod

CHECK_INTERVAL: Final = 1.0  # how often the device is checked, and a pending pass looked at
DEBOUNCE: Final = 0.05  # a burst of watch events (a relist of 5,000 objects) makes one pass
GUARD_INTERVAL: Final = 10.0  # between passes, the backstop and rules are checked this often
BACKOFF_MIN: Final = 1.0
BACKOFF_MAX: Final = 16.0


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
            self.step(woke=woke)
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
        """The stored key goes on the device before it is published: a rotation whose device
        step failed is finished here first, so peers never get a key the device does not hold."""
        if self._unapplied:
            try:
                self.datapath.set_private_key(self.keys.key.raw)
            except Exception as e:  # no device, or its UAPI refused: the next turn tries again
                self._unapplied = f"the new key is not on the device yet: {e}"
                return
            self._unapplied = ""
        self.publisher.keep()

    def rotate_key(self) -> tuple[str, float]:
        """A new keypair: stored atomically, put on the device, then published.

        Peers follow once they see the new key on their watch. Returns the new public key and
        when it was made; raises if it could not be published (the loop keeps trying).
        """
        with self._lock:
            wall = self.clock.wall()
            key = self.keys.rotate(wall=wall)
            public = key.public_key_b64()
            self._unapplied = "the new key is not on the device yet"
            self._keep_key()
            self.log.info("key_rotated", public_key=public)
            self.recorder.record("Normal", "KeyRotated", f"new public key {public}")
            published = self.publisher.published
        self.wake()
        if not published:
            raise RuntimeError(
                self._unapplied
                or f"the new key is on the device but not published yet: "
                f"{self.publisher.last_error}"
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
