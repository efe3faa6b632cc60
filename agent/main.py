"""`podwire-agent`: the node daemon. Loads the config, builds the agent and runs it.

Stops cleanly on SIGTERM: the API socket is removed, the device and its peers are left as
they are, so traffic between pods keeps flowing while the next agent starts. An agent armed by
an uninstall request (`podwire prepare-uninstall`, the chart's pre-delete hook) removes them
instead, with the backstops and rules: everything it made on the node but the key folder.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence

from podwire.agent import api, app, config, keys, kube, log, metrics


def main(argv: Sequence[str] | None = None) -> int:
    log.configure()
    logger = log.get("agent")
    try:
        cfg = config.load()
    except config.ConfigError as e:
        print(f"podwire-agent: configuration: {e}", file=sys.stderr)
        return 2
    try:
        client = kube.Client(kubeconfig=str(cfg.kubeconfig) if cfg.kubeconfig else None)
    except kube.KubeError as e:
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    agent = app.build(cfg, client=client, stop=stop)
    agent.http = metrics.HttpServer(agent, port=cfg.metrics_port, host=cfg.metrics_address)
    agent.local_api = api.ApiServer(agent, cfg.api_socket)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        running = agent.start(stop)
    except keys.KeyFileError as e:
        logger.error("key_file_unusable", error=str(e))
        print(f"podwire-agent: {e}", file=sys.stderr)
        agent.stop()
        return 1
    except Exception as e:
        if stop.is_set():  # told to stop while starting (waiting for its engine): no failure
            agent.stop()
            return 0
        logger.error("start_failed", error=str(e))
        print(f"podwire-agent: could not start: {e}", file=sys.stderr)
        agent.stop()
        return 1
    if running:
        logger.info("started", node=cfg.node_name, datapath=agent.datapath.kind)
        stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
