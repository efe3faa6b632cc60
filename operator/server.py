"""/healthz, /readyz and /metrics over HTTP, for the kubelet's probes and Prometheus.

/healthz: the process serves and its loops run (a replica that waits for the lease is
healthy). /readyz: it reaches the apiserver, leading or waiting, with one line per component.
/metrics: leader or not, rotations, stale objects removed, conflicts; read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podwire.agent import component, probes
from podwire.operator import controller as controller_mod


class Operator(Protocol):
    """What the server reads of the running operator (podwire.operator.app.Operator)."""

    controller: controller_mod.Controller

    def leading(self) -> bool: ...

    def alive(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...

    def health(self) -> list[tuple[str, component.Health]]: ...


class OperatorCollector(Collector):
    def __init__(self, operator: Operator) -> None:
        self.operator = operator

    def collect(self) -> Iterator[Any]:
        counts = self.operator.controller.counts
        yield GaugeMetricFamily(
            "podwire_operator_leader",
            "1 while this replica leads (holds the Lease), else 0",
            value=1 if self.operator.leading() else 0,
        )
        rotations = CounterMetricFamily(
            "podwire_operator_rotations",
            "Node key rotations this replica finished, by result",
            labels=["result"],
        )
        for result in ("done", "timed_out"):
            rotations.add_metric([result], counts.rotations[result])
        yield rotations
        yield CounterMetricFamily(
            "podwire_operator_stale_removed",
            "WireguardNodes removed because their Node was gone",
            value=counts.stale_removed,
        )
        found = GaugeMetricFamily(
            "podwire_operator_conflicts",
            "WireguardNodes flagged with a Conflict now, by reason",
            labels=["reason"],
        )
        for reason in ("DuplicateKey", "OverlappingPodCIDR"):
            found.add_metric([reason], counts.conflicts[reason])
        yield found
        yield GaugeMetricFamily(
            "podwire_operator_rotation_queue",
            "WireguardNodes queued for a key rotation (the one in progress included)",
            value=counts.queued,
        )
        yield CounterMetricFamily("podwire_operator_passes", "Passes of the leader's loop", value=counts.passes)  # fmt: skip
        yield CounterMetricFamily("podwire_operator_pass_errors", "Passes that failed", value=counts.errors)  # fmt: skip


class HttpServer(probes.ProbeServer):
    """The operator's probes and Prometheus endpoint (agent/probes.py serves them, with the
    agent's request timeout and bound on connections)."""

    def __init__(self, operator: Operator, *, host: str, port: int) -> None:
        self.operator = operator
        super().__init__(
            collector=OperatorCollector(operator),
            alive=operator.alive,
            ready=operator.ready,
            healths=operator.health,
            host=host,
            port=port,
        )
