"""/healthz, /readyz and /metrics over HTTP, for kubelet probes and Prometheus.

They serve from the agent's first moments: /healthz says the process serves (a liveness probe
must not kill an agent that waits for its Node); /readyz says ready once every component is
healthy, and otherwise which one is not and why, with one line per component below. /metrics:
gauges and counters read from the components and the device at scrape time, so nothing is
double-booked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podwire.agent import app, probes


class AgentCollector(Collector):
    def __init__(self, agent: app.Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        out = a.reconciler.outcome
        yield GaugeMetricFamily(
            "podwire_peers", "Peers programmed on the device", value=len(out.peers)
        )
        yield GaugeMetricFamily(
            "podwire_peers_refused",
            "Nodes refused as peers",
            value=len({r.node for r in out.refusals}),
        )
        yield CounterMetricFamily("podwire_reconciles", "Reconcile passes", value=out.passes)
        yield GaugeMetricFamily("podwire_competing_routes", "Routes that would take pod traffic past the device", value=len(out.competing_routes))  # fmt: skip
        yield CounterMetricFamily(
            "podwire_reconcile_errors", "Reconcile passes that failed", value=out.errors
        )
        yield GaugeMetricFamily(
            "podwire_reconcile_duration_seconds",
            "Duration of the last reconcile pass",
            value=out.last_seconds,
        )
        yield CounterMetricFamily(
            "podwire_watch_restarts",
            "Watches restarted (relists, reconnects)",
            value=a.watches.restarts,
        )
        yield CounterMetricFamily(
            "podwire_device_restarts",
            "Times the device was found gone or replaced and brought back",
            value=a.watchdog.restarts,
        )
        yield CounterMetricFamily(
            "podwire_wireguardnode_repairs",
            "Times the own WireguardNode's spec, changed by someone else, was put back",
            value=a.publisher.repairs,
        )
        ctl = a.controller
        yield GaugeMetricFamily(
            "podwire_key_age_seconds",
            "Age of the node's key in use (since it was made or last rotated)",
            value=max(0.0, a.clock.wall() - a.keys.made_wall) if a.keys.made_wall else 0.0,
        )
        rotations = CounterMetricFamily(
            "podwire_key_rotations", "Key rotations by this agent", labels=["result"]
        )
        rotations.add_metric(["done"], ctl.rotations_done)
        rotations.add_metric(["failed"], ctl.rotations_failed)
        yield rotations
        yield GaugeMetricFamily(
            "podwire_peers_on_current_key",
            "Peers that have handshaken with the current key since the last rotation",
            value=a.publisher.peers_on_current_key
            if a.publisher.peers_on_current_key is not None
            else len(out.peers),
        )
        yield CounterMetricFamily(
            "podwire_controller_turn_errors",
            "Turns of the control loop that raised (a bug; the log has the traceback)",
            value=ctl.turn_errors,
        )
        healthy = GaugeMetricFamily(
            "podwire_component_healthy",
            "1 when the agent's component is healthy, as /readyz reports it",
            labels=["component"],
        )
        for name, h in a.health():
            healthy.add_metric([name], 1 if h.ok else 0)
        yield healthy
        advised = GaugeMetricFamily(
            "podwire_advisory",
            "1 for each kernel setting on the node that costs WireGuard throughput"
            " (`podwire status` and status.advisories say what to change)",
            labels=["name"],
        )
        for adv in a.datapath.advisories:
            advised.add_metric([adv.name], 1)
        yield advised
        yield from self._peers(a)

    def _peers(self, a: app.Agent) -> Iterator[Any]:
        """Per peer; with lanes, per peer and lane (a `lane` label), since each lane's device
        has its own session and counters with the peer."""
        yield GaugeMetricFamily(
            "podwire_lanes", "WireGuard devices (lanes) of this node", value=a.datapath.lane_count
        )
        names = {}
        for desired in a.reconciler.outcome.peers:
            names[desired.public_key] = desired.node
            names.update((lane.public_key, desired.node) for lane in desired.lanes)
        labels = ["peer", "lane"] if a.datapath.lanes else ["peer"]
        age = GaugeMetricFamily(
            "podwire_peer_handshake_age_seconds",
            "Seconds since the last handshake",
            labels=labels,
        )
        rx = CounterMetricFamily(
            "podwire_peer_rx_bytes", "Bytes received from the peer", labels=labels
        )
        tx = CounterMetricFamily("podwire_peer_tx_bytes", "Bytes sent to the peer", labels=labels)
        try:
            peers = [
                (lane, p) for lane, backend in a.datapath.backends() for p in backend.read().peers
            ]
        except Exception:  # no device yet, or it is being brought back: no peer figures
            peers = []
        now = time.time()
        for lane, p in peers:
            values = [names.get(p.public_key, p.public_key)]
            values += [str(lane)] if a.datapath.lanes else []
            if p.last_handshake:
                age.add_metric(values, now - p.last_handshake)
            rx.add_metric(values, p.rx_bytes)
            tx.add_metric(values, p.tx_bytes)
        yield age
        yield rx
        yield tx


REQUEST_TIMEOUT = probes.REQUEST_TIMEOUT
MAX_CONNECTIONS = probes.MAX_CONNECTIONS


class HttpServer(probes.ProbeServer):
    """The agent's probes and Prometheus endpoint (agent/probes.py serves them)."""

    def __init__(
        self,
        agent: app.Agent,
        *,
        port: int,
        host: str = "0.0.0.0",
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.agent = agent
        super().__init__(
            collector=AgentCollector(agent),
            alive=lambda: (True, ""),  # it answers: the process is not wedged
            ready=agent.ready,
            healths=agent.health,
            host=host,
            port=port,
            request_timeout=request_timeout,
            max_connections=max_connections,
        )


def readiness(agent: app.Agent) -> tuple[int, str]:
    """The /readyz answer: the verdict, then one line per component."""
    return probes.readiness(agent.ready, agent.health)
