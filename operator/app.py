"""The operator assembled: watches, leader election, the leader's loop and the HTTP server.

Start order: the watches first (a replica that waits keeps its copies warm), then the election,
then the loop, which acts only while the election says we lead; the server answers from the
start. Stop gives the lease up, so the replica that waits takes over at once.
"""

from __future__ import annotations

import threading

from podwire.agent import clock as clock_mod
from podwire.agent import component, kube
from podwire.operator import config, controller, elector, leases, server

STOP_WAIT = 10.0  # the longest a lease call may take


class Operator:
    def __init__(self, cfg: config.Config, client: kube.Client, *, clock: clock_mod.Clock | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.elector = elector.Elector(
            leases.LeaseApi(client, namespace=cfg.namespace, name=cfg.lease_name),
            identity=cfg.identity,
            duration=cfg.lease_duration,
            renew_period=cfg.renew_period,
            renew_deadline=cfg.renew_deadline,
            retry_period=cfg.retry_period,
            clock=clock,
            on_change=lambda leading: self.controller.changed(),
        )
        self.nodes = kube.Informer(client, "nodes", on_change=lambda: self.controller.changed())
        self.wgnodes = kube.Informer(client, "wgnodes", on_change=lambda: self.controller.changed())
        self.controller = controller.Controller(
            client,
            leading=lambda: self.elector.leading,
            nodes=self.nodes,
            wgnodes=self.wgnodes,
            stale_grace=cfg.stale_grace,
            rotation_deadline=cfg.rotation_deadline,
            key_rotation_interval=cfg.key_rotation_interval,
            resync=cfg.resync,
            clock=clock,
        )
        self.http = server.HttpServer(self, host=cfg.metrics_host, port=cfg.metrics_port)
        self._stop = threading.Event()

    def start(self) -> None:
        self.http.start()
        self.nodes.start()
        self.wgnodes.start()
        self.elector.start(self._stop)
        self.controller.start(self._stop)

    def stop(self) -> None:
        self._stop.set()
        self.controller.changed()  # out of its wait at once
        self.nodes.stop()
        self.wgnodes.stop()
        # No write of ours may land after the lease is given up, nor race the release itself.
        self.controller.join(STOP_WAIT)
        self.elector.join(STOP_WAIT)
        self.elector.release()
        self.http.stop()

    def leading(self) -> bool:
        return self.elector.leading

    def alive(self) -> tuple[bool, str]:
        for part in (self.elector, self.controller):
            if not part.alive():
                return False, f"{part.name} stopped"
        return True, ""

    def ready(self) -> tuple[bool, str]:
        if not self.elector.connected:
            return False, f"cannot reach the apiserver: {self.elector.last_error}"
        return True, ""

    def health(self) -> list[tuple[str, component.Health]]:
        watches = [(f"watch {i.kind}", _watch(i)) for i in (self.nodes, self.wgnodes)]
        return [
            (self.elector.name, self.elector.health()),
            (self.controller.name, self.controller.health()),
            *watches,
        ]


def _watch(informer: kube.Informer) -> component.Health:
    if informer.last_error:
        return component.degraded(informer.last_error)
    return component.ok("synced" if informer.synced else "listing")
