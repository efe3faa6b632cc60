"""The HTTP server for the kubelet's probes and Prometheus, shared by the agent and operator.

/healthz answers whether the process should be restarted, /readyz whether it does its job (the
verdict, then one line per component), /metrics what its collector reports at scrape time. It
must keep answering whatever a client does: a connection that says nothing is dropped after a
timeout, and past a bound on connections served at once, new ones are closed at once.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client.registry import Collector

from podwire.agent import component

REQUEST_TIMEOUT = 5.0  # a client that says nothing for this long is disconnected
MAX_CONNECTIONS = 16  # connections served at once; more are closed at once

Verdict = Callable[[], tuple[bool, str]]  # (ok, why not)
Healths = Callable[[], list[tuple[str, component.Health]]]


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


def readiness(ready: Verdict, healths: Healths) -> tuple[int, str]:
    """The /readyz answer: the status code and the verdict, then one line per component."""
    ok, reason = ready()
    lines = ["ready" if ok else f"not ready: {reason}"]
    lines += [f"{name}: {'ok' if h.ok else 'not ok'}: {h.message}" for name, h in healths()]
    return (200 if ok else 503), "\n".join(lines) + "\n"


class ProbeServer:
    """The server as a component of the process that runs it."""

    name = "http"

    def __init__(
        self,
        *,
        collector: Collector,
        alive: Verdict,
        ready: Verdict,
        healths: Healths,
        host: str,
        port: int,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.collector = collector
        self.alive = alive
        self.ready = ready
        self.healths = healths
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: _BoundedServer | None = None

    @property
    def bound_port(self) -> int:
        """The port it listens on (the one the kernel chose, for port 0)."""
        return int(self._server.server_address[1]) if self._server else 0

    def start(self) -> None:
        registry = prometheus_client.CollectorRegistry()
        registry.register(self.collector)
        self._server = _BoundedServer(
            (self.host, self.port), self._handler(registry), max_connections=self.max_connections
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

    def _handler(
        self, registry: prometheus_client.CollectorRegistry
    ) -> type[http.server.BaseHTTPRequestHandler]:
        probes = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # Set on the connection's socket: a request not read within it ends the connection.
            timeout = probes.request_timeout

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok, why = probes.alive()
                    self._reply(200 if ok else 503, b"ok\n" if ok else f"{why}\n".encode())
                elif self.path == "/readyz":
                    code, text = readiness(probes.ready, probes.healths)
                    self._reply(code, text.encode())
                elif self.path == "/metrics":
                    body = prometheus_client.generate_latest(registry)
                    self._reply(200, body, prometheus_client.CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found\n")

            def _reply(
                self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the process's own log

        return Handler
