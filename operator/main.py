"""`podwire-operator`: the cluster operator's entry point.

Exit codes: 2 for a bad setting (the message names the flag), 1 when it cannot start (no
kubeconfig, the port taken), 0 after SIGTERM or SIGINT, once the lease is given up.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence

from podwire.agent import kube, log
from podwire.operator import app, config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config.load(argv)
    except config.ConfigError as e:
        print(f"podwire-operator: configuration: {e}", file=sys.stderr)
        return 2
    log.configure(level=cfg.log_level)
    logger = log.get("operator", identity=cfg.identity)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # before start: a SIGTERM while starting counts
    try:
        operator = app.Operator(cfg, kube.Client(kubeconfig=cfg.kubeconfig))
        operator.start()
    except Exception as e:
        logger.error("start_failed", error=str(e))
        print(f"podwire-operator: could not start: {e}", file=sys.stderr)
        return 1
    logger.info(
        "started",
        namespace=cfg.namespace,
        lease=cfg.lease_name,
        metrics=f"{cfg.metrics_host}:{operator.http.bound_port}",
        key_rotation_interval=cfg.key_rotation_interval or "off",
        rotation_deadline=cfg.rotation_deadline,
    )
    stop.wait()
    operator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
