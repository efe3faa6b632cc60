"""Leader election on a Lease: one replica acts, the others wait to take over.

Call step() in a loop (run() does, on its own thread): each step reads the lease once and
renews, takes or waits for it, and returns how long to sleep. `leading` turns False by itself
when the leader has not renewed for the renew deadline, before its lease runs out for the
others, so that two replicas never act at once as long as clocks run at the same rate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from podwire.agent import clock as clock_mod
from podwire.agent import component, kube, log
from podwire.operator import election, leases

MIN_WAIT = 0.05


class Elector:
    name = "leader-election"

    def __init__(
        self,
        api: leases.LeaseApi,
        *,
        identity: str,
        duration: float,
        renew_period: float,
        renew_deadline: float,
        retry_period: float,
        clock: clock_mod.Clock | None = None,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self.api = api
        self.identity = identity
        self.duration = duration
        self.renew_period = renew_period
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock or clock_mod.MonotonicClock()
        self.on_change = on_change
        self.connected = False
        self.last_error = ""
        self.holder = ""
        self._renewed_mono: float | None = None  # our last successful renewal
        self._seen: election.Observation | None = None
        self._record: election.Record | None = None
        self._was_leading = False
        self._thread: threading.Thread | None = None
        self._log: Any = log.get("operator", identity=identity)

    @property
    def leading(self) -> bool:
        if self._renewed_mono is None:
            return False
        return self.clock.monotonic() - self._renewed_mono < self.renew_deadline

    def health(self) -> component.Health:
        if not self.connected:
            return component.degraded(f"cannot reach the apiserver: {self.last_error}")
        if self.leading:
            return component.ok(f"leading as {self.identity}")
        return component.ok(f"waiting; {self.holder or 'nobody'} leads")

    # -- the loop ----------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self.run, args=(stop,), name="elector", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Waits for the loop to end (after stop is set), a write in flight included."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            wait = self.step()
            self._notify()
            stop.wait(max(wait, MIN_WAIT))

    def step(self) -> float:
        """One look at the lease; returns the seconds until the next."""
        try:
            lease = self.api.get()
            self.connected, self.last_error = True, ""
            if lease is None:
                return self._create()
            record = election.read(lease)
            self.holder = record.holder
            if record.holder == self.identity:
                return self._renew(record)
            return self._wait_or_take(record)
        except kube.KubeError as e:
            # Refused (403) counts too: a replica that cannot hold the lease is not ready.
            self.connected, self.last_error = False, str(e)
            self._log.warning("lease_call_failed", error=str(e))
            return self.retry_period

    def _create(self) -> float:
        now = self.clock.wall()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.api.name, "namespace": self.api.namespace},
            "spec": election.spec(
                self.identity, duration=self.duration, now_wall=now, previous=None
            ),
        }
        return self._write(self.api.create, body)

    def _renew(self, record: election.Record) -> float:
        return self._put(record)

    def _wait_or_take(self, record: election.Record) -> float:
        self._lost()
        now_mono = self.clock.monotonic()
        self._seen = election.observe(
            record,
            self._seen,
            now_mono=now_mono,
            now_wall=self.clock.wall(),
            trust=self.retry_period,
        )
        left = election.expires_in(record, self._seen, now_mono=now_mono)
        if left > 0:
            return min(self.retry_period, left)
        self._log.info("taking_over_lease", previous_holder=record.holder or None)
        return self._put(record)

    def _put(self, record: election.Record) -> float:
        now = self.clock.wall()
        spec = election.spec(self.identity, duration=self.duration, now_wall=now, previous=record)
        return self._write(self.api.replace, self._lease(record.resource_version, spec))

    def _lease(self, resource_version: str | None, spec: Any) -> dict[str, Any]:
        """The Lease to write over the one read at `resource_version` (409 if it changed)."""
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.api.name,
                "namespace": self.api.namespace,
                "resourceVersion": resource_version,
            },
            "spec": spec,
        }

    def _write(self, call: Callable[[Any], Any], body: Any) -> float:
        """Writes the lease; we lead from the moment the write was sent, not answered."""
        started = self.clock.monotonic()
        try:
            written = call(body)
        except kube.KubeError as e:
            if e.status == 409:  # someone else wrote the lease first: step down, look again
                self._lost()
                self._log.info("lease_taken_by_another", error=str(e))
                return self.retry_period
            raise
        self._record = election.read(written)
        self.holder = self.identity
        self._renewed_mono = started
        return self.renew_period

    def _lost(self) -> None:
        self._renewed_mono = None

    def _notify(self) -> None:
        leading = self.leading
        if leading != self._was_leading:
            self._was_leading = leading
            self._log.info("leading" if leading else "not_leading", holder=self.holder)
            self.on_change(leading)

    # -- stopping ----------------------------------------------------------------------------

    def release(self) -> None:
        """Gives the lease up, if we hold it, so that another replica takes over at once."""
        if not self.leading or self._record is None:
            return
        self._renewed_mono = None
        body = self._lease(
            self._record.resource_version,
            election.released_spec(self._record, now_wall=self.clock.wall()),
        )
        try:
            self.api.replace(body)
            self._log.info("lease_released")
        except kube.KubeError as e:
            self._log.warning("lease_release_failed", error=str(e))
        self._notify()
