"""`podwire-agent`: the node daemon. Wires config, key, datapath, controller, API and metrics.

Stops cleanly on SIGTERM: the API socket is removed, the device and its peers are left as
they are, so traffic between pods keeps flowing while the next agent starts.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Sequence

from podwire.agent import api, config, controller, datapath, events, keys, kube, log, metrics


def _internal_ip(client: kube.Client, node: str, stop: threading.Event) -> str | None:
    """The Node's InternalIP, the underlay the device's MTU derives from; waits for the Node."""
    logger = log.get("agent")
    while not stop.is_set():
        try:
            obj = client.get_node(node)
        except kube.KubeError as e:
            logger.warning("node_unreadable", error=str(e))
            obj = None
        if obj is not None:
            for a in obj.get("status", {}).get("addresses", []):
                if a.get("type") == "InternalIP":
                    return str(a.get("address"))
            return None
        stop.wait(2.0)
    return None


def _backend(
    cfg: config.Config, underlay_address: str | None
) -> tuple[datapath.Backend, datapath.Routes]:
    backend = datapath.select_backend(
        cfg.datapath,
        cfg.device,
        mtu=cfg.mtu,
        underlay_address=underlay_address,
        features=(cfg.features.gro, cfg.features.big_tcp, cfg.features.udp_gro_forwarding),
        engine_log=cfg.key_path.parent / f"{cfg.device}-engine.log",
        **({"engine_command": (str(cfg.engine),)} if cfg.engine else {}),
    )
    return backend, datapath.Routes(cfg.device)


def main(argv: Sequence[str] | None = None) -> int:
    log.configure()
    logger = log.get("agent")
    try:
        cfg = config.load()
    except config.ConfigError as e:
        print(f"podwire-agent: configuration: {e}", file=sys.stderr)
        return 2
    client = kube.Client(kubeconfig=str(cfg.kubeconfig) if cfg.kubeconfig else None)
    broadcaster = events.Broadcaster()

    def on_event(etype: str, reason: str, message: str, node: str) -> None:
        broadcaster.publish(events.Event(time.time(), etype, reason, message, node))

    stop = threading.Event()
    started: list[controller.Controller] = []
    backends: list[datapath.Backend] = []
    phase = [f"waiting for Node {cfg.node_name} and its InternalIP"]

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("stopping", signal=signal.Signals(signum).name)
        stop.set()
        for ctl in started:
            ctl.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if cfg.fail_closed:
            # Before waiting for anything: pod traffic with no peer is dropped, never sent clear.
            datapath.Routes(cfg.device).install_fail_closed(cfg.cluster_pod_cidrs)
        http_server = metrics.serve(
            lambda: started[0] if started else None,
            lambda: backends[0].peer_stats() if backends else [],
            port=cfg.metrics_port,
            starting=lambda: phase[0],
        )
        underlay_address = _internal_ip(client, cfg.node_name, stop)
        if stop.is_set():
            http_server.shutdown()
            return 0
        phase[0] = "bringing up the device"
        backend, routes = _backend(cfg, underlay_address)
        backends.append(backend)
        ctl = controller.Controller(
            cfg, client=client, backend=backend, routes=routes, on_event=on_event
        )
        ctl.start()
    except keys.KeyFileError as e:
        logger.error("key_file_unusable", error=str(e))
        print(f"podwire-agent: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        logger.error("start_failed", error=str(e))
        print(f"podwire-agent: could not start: {e}", file=sys.stderr)
        return 1

    peer_stats = backend.peer_stats
    grpc_server = api.serve(
        api.Servicer(ctl, peer_stats=peer_stats, broadcaster=broadcaster, rotate=ctl.rotate_key),
        cfg.api_socket,
    )
    started.append(ctl)
    if stop.is_set():  # a signal came while starting
        ctl.stop()
    logger.info("started", node=cfg.node_name, datapath=backend.datapath)
    runner = threading.Thread(target=ctl.run, name="controller", daemon=True)
    runner.start()
    stop.wait()
    runner.join(5)
    grpc_server.stop(1)
    http_server.shutdown()
    cfg.api_socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
