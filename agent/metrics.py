"""/healthz, /readyz and /metrics over HTTP, for kubelet probes and Prometheus.

They serve from the agent's first moments: /healthz says the process serves (a liveness probe
must not kill an agent that waits for its Node); /readyz says why it is not ready yet, until
the device holds what synced watches asked for and the last reconcile succeeded. /metrics: gauges and counters read from the controller's state and
the device's peer statistics at scrape time, so nothing is double-booked.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podwire.agent import controller as controller_mod

ControllerRef = Callable[[], "controller_mod.Controller | None"]


class AgentCollector(Collector):
    def __init__(self, ctl: ControllerRef, peer_stats: Callable[[], list[Any]]) -> None:
        self.ctl = ctl
        self.peer_stats = peer_stats

    def collect(self) -> Iterator[Any]:
        ctl = self.ctl()
        if ctl is None:  # still starting: nothing to count yet
            return
        st = ctl.state
        yield GaugeMetricFamily(
            "podwire_peers", "Peers programmed on the device", value=len(st.peers)
        )
        yield GaugeMetricFamily(
            "podwire_peers_refused",
            "Nodes refused as peers",
            value=len({r.node for r in st.refusals}),
        )
        yield CounterMetricFamily("podwire_reconciles", "Reconcile passes", value=st.reconciles)
        yield CounterMetricFamily(
            "podwire_reconcile_errors", "Reconcile passes that failed", value=st.reconcile_errors
        )
        yield GaugeMetricFamily(
            "podwire_reconcile_duration_seconds",
            "Duration of the last reconcile pass",
            value=st.last_reconcile_seconds,
        )
        yield CounterMetricFamily(
            "podwire_watch_restarts",
            "Watches restarted (relists, reconnects)",
            value=st.watch_restarts,
        )
        yield CounterMetricFamily(
            "podwire_device_restarts",
            "Times the device was found gone or replaced and brought back",
            value=st.device_restarts,
        )
        names = {p.public_key: p.node for p in st.peers}
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
            stats = self.peer_stats()
        except Exception:
            stats = []
        now = time.time()
        for s in stats:
            peer = names.get(s.public_key, s.public_key)
            if s.last_handshake:
                age.add_metric([peer], now - s.last_handshake)
            rx.add_metric([peer], s.rx_bytes)
            tx.add_metric([peer], s.tx_bytes)
        yield age
        yield rx
        yield tx


def serve(
    ctl: ControllerRef,
    peer_stats: Callable[[], list[Any]],
    *,
    port: int,
    host: str = "0.0.0.0",
    starting: Callable[[], str] = lambda: "starting",
) -> http.server.ThreadingHTTPServer:
    """Serves in a thread. ctl() is None while the agent starts; starting() then says why."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(AgentCollector(ctl, peer_stats))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, b"ok\n")
            elif self.path == "/readyz":
                current = ctl()
                if current is None:
                    self._reply(503, f"not ready: {starting()}\n".encode())
                    return
                st = current.state
                ready = st.programmed and not st.last_reconcile_error
                reason = st.last_reconcile_error or "waiting for the watches to sync"
                self._reply(
                    200 if ready else 503,
                    b"ready\n" if ready else f"not ready: {reason}\n".encode(),
                )
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

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
