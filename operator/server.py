"""/healthz, /readyz and /metrics over HTTP, for the kubelet's probes and Prometheus.

/healthz: the process serves and its loops run (a replica that waits for the lease is
healthy). /readyz: it reaches the apiserver, leading or waiting, with one line per component.
/metrics: leader or not, rotations, stale objects removed, conflicts; read at scrape time.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podwire.agent import component
from podwire.operator import controller as controller_mod

REQUEST_TIMEOUT = 5.0


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


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class HttpServer:
    name = "http"

    def __init__(self, operator: Operator, *, host: str, port: int) -> None:
        self.operator = operator
        self.host = host
        self.port = port
        self._server: _Server | None = None

    @property
    def bound_port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def start(self) -> None:
        registry = prometheus_client.CollectorRegistry()
        registry.register(OperatorCollector(self.operator))
        self._server = _Server((self.host, self.port), _handler(self.operator, registry))
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _lines(operator: Operator, verdict: str) -> str:
    rows = [f"{name}: {'ok' if h.ok else 'not ok'}: {h.message}" for name, h in operator.health()]
    return "\n".join([verdict, *rows]) + "\n"


def _handler(
    operator: Operator, registry: prometheus_client.CollectorRegistry
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def do_GET(self) -> None:
            if self.path == "/healthz":
                alive, why = operator.alive()
                self._reply(200 if alive else 503, b"ok\n" if alive else f"{why}\n".encode())
            elif self.path == "/readyz":
                ready, why = operator.ready()
                text = _lines(operator, "ready" if ready else f"not ready: {why}")
                self._reply(200 if ready else 503, text.encode())
            elif self.path == "/metrics":
                body = prometheus_client.generate_latest(registry)
                self._reply(200, body, prometheus_client.CONTENT_TYPE_LATEST)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the operator's own log

    return Handler
