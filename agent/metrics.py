"""/healthz, /readyz and /metrics over HTTP, for kubelet probes and Prometheus.

They serve from the agent's first moments: /healthz says the process serves (a liveness probe
must not kill an agent that waits for its Node); /readyz says ready once every component is
healthy, and otherwise which one is not and why, with one line per component below. /metrics:
gauges and counters read from the components and the device at scrape time, so nothing is
double-booked.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podwire.agent import app, component


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
        names = {p.public_key: p.node for p in a.reconciler.outcome.peers}
        age = GaugeMetricFamily(
            "podwire_peer_handshake_age_seconds",
            "Seconds since the last handshake",
            labels=["peer"],
        )
        rx = CounterMetricFamily(
            "podwire_peer_rx_bytes", "Bytes received from the peer", labels=["peer"]
        )
        tx = CounterMetricFamily("podwire_peer_tx_bytes", "Bytes sent to the peer", labels=["peer"])
        try:
            peers = a.datapath.require().read().peers
        except Exception:  # no device yet, or it is being brought back: no peer figures
            peers = ()
        now = time.time()
        for p in peers:
            peer = names.get(p.public_key, p.public_key)
            if p.last_handshake:
                age.add_metric([peer], now - p.last_handshake)
            rx.add_metric([peer], p.rx_bytes)
            tx.add_metric([peer], p.tx_bytes)
        yield age
        yield rx
        yield tx


REQUEST_TIMEOUT = 5.0  # a client that says nothing for this long is disconnected
MAX_CONNECTIONS = 16  # connections served at once; more are closed at once


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, up to a bound: the probes must not starve behind idle clients."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, *, max_connections: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HttpServer:
    """The probes' and Prometheus' HTTP server, as a component."""

    name = "http"

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
        self.port = port
        self.host = host
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: _BoundedServer | None = None

    @property
    def bound_port(self) -> int:
        """The port it listens on (the one the kernel chose, for port 0)."""
        return int(self._server.server_address[1]) if self._server else 0

    def start(self) -> None:
        registry = prometheus_client.CollectorRegistry()
        registry.register(AgentCollector(self.agent))
        self._server = _BoundedServer(
            (self.host, self.port),
            _handler(self.agent, registry, request_timeout=self.request_timeout),
            max_connections=self.max_connections,
        )
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def health(self) -> component.Health:
        if self._server is None:
            return component.degraded("not serving")
        return component.ok(f"serving on {self.host}:{self.bound_port}")


def readiness(agent: app.Agent) -> tuple[int, str]:
    """The /readyz answer: the verdict, then one line per component."""
    ready, reason = agent.ready()
    lines = ["ready" if ready else f"not ready: {reason}"]
    lines += [f"{name}: {'ok' if h.ok else 'not ok'}: {h.message}" for name, h in agent.health()]
    return (200 if ready else 503), "\n".join(lines) + "\n"


def _handler(
    agent: app.Agent, registry: prometheus_client.CollectorRegistry, *, request_timeout: float
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # Set on the connection's socket: a request not read within it ends the connection.
        timeout = request_timeout

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, b"ok\n")
            elif self.path == "/readyz":
                code, text = readiness(agent)
                self._reply(code, text.encode())
            elif self.path == "/metrics":
                self._reply(
                    200,
                    prometheus_client.generate_latest(registry),
                    prometheus_client.CONTENT_TYPE_LATEST,
                )
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the agent's own log

    return Handler
