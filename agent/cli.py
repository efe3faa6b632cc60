"""`podwire`: the command line for the operator of a node.

Its own commands speak to the node's agent over the local API. Other parts of podwire add
theirs as plugins, through the `podwire.cli` entry point group: each entry point names a
function that adds its subcommand to the parser and sets the `handler` that runs it. The
sandbox does so for `podwire sandbox`; this module never imports it, so an image without the
sandbox still has a whole `podwire status`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from podwire.api import wgnode

DEFAULT_SOCKET = "/var/run/podwire/agent.sock"
PLUGIN_GROUP = "podwire.cli"

# A plugin's entry point: adds its subcommand, with a `handler(args) -> exit code` default.
Plugin = Callable[["argparse._SubParsersAction[Any]"], None]


def _parser(plugins: Iterable[Plugin] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podwire", description="podwire: WireGuard for pod traffic")
    sub = p.add_subparsers(dest="command", required=True)
    for register in discover_plugins() if plugins is None else plugins:
        register(sub)
    for name, text in (
        ("status", "this node's agent: key, datapath, sync"),
        ("peers", "the peers on the device"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("-o", "--output", choices=["table", "json"], default="table")
        c.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's API socket")
        c.set_defaults(handler=_agent_command)
    r = sub.add_parser(
        "rotate-key",
        help="give a node a new key: this node over the local API, another through the cluster",
        description=(
            "Without --node or --all, asks this node's agent over its local API. With --node, "
            f"sets {wgnode.ROTATE_ANNOTATION} on that node's WireguardNode through the kubeconfig (as "
            "`kubectl annotate` can) and waits for its agent to rotate; with --all, queues every "
            "node for the operator, which rotates them one at a time."
        ),
    )
    who = r.add_mutually_exclusive_group()
    who.add_argument("--node", help="the node whose key to rotate")
    who.add_argument("--all", action="store_true", help="a rolling rotation of every node")
    r.add_argument("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config")
    r.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's API socket")
    r.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for --node (0: do not wait)"
    )
    r.set_defaults(handler=_rotate_key)
    u = sub.add_parser(
        "prepare-uninstall",
        help="arm every node's agent to clear its node when it stops (the chart's pre-delete hook)",
        description=(
            f"Sets {wgnode.UNINSTALL_ANNOTATION} to now on every WireguardNode and waits until "
            f"each node's agent acknowledges it (condition {wgnode.UNINSTALL_ARMED}=True). An "
            "armed agent removes its devices, routes, backstops and rules when it is stopped "
            "within 10 minutes; the key folder stays. Names the nodes that did not acknowledge "
            "and exits 0 all the same: a dead node must not block an uninstall."
        ),
    )
    u.add_argument(
        "--kubeconfig",
        help="default: $KUBECONFIG, then the in-cluster service account, then ~/.kube/config",
    )
    u.add_argument(
        "--timeout", type=_duration, default=60.0, help="how long to wait: 60, 60s, 2m (0: no wait)"
    )
    u.set_defaults(handler=_prepare_uninstall)
    return p


def _duration(text: str) -> float:
    """Seconds from 60, 60s or 2m (what a Helm value like `60s` holds)."""
    number, scale = text.strip(), 1.0
    if number.endswith(("s", "m")):
        number, scale = number[:-1], 60.0 if number.endswith("m") else 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (60, 60s, 2m)") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return seconds


def _prepare_uninstall(args: argparse.Namespace) -> int:
    from podwire.agent import kube

    path = args.kubeconfig or os.environ.get("KUBECONFIG")
    if not path and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        path = os.path.expanduser("~/.kube/config")
    now = wgnode.format_precise_time(time.time())
    try:
        client = kube.Client(kubeconfig=path)
        names = sorted(o["metadata"]["name"] for o in client.list_all("wgnodes")[0])
        for name in names:
            client.patch_wgnode_metadata(
                name, {"metadata": {"annotations": {wgnode.UNINSTALL_ANNOTATION: now}}}
            )
    except (kube.KubeError, OSError) as e:  # the uninstall goes on; the nodes keep their state
        print(f"podwire: could not ask the nodes to prepare: {e}", file=sys.stderr)
        return 0
    print(f"asked {len(names)} nodes to clear themselves when their agent stops ({now})")
    waiting = set(names)
    deadline = time.monotonic() + args.timeout
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            try:
                obj = client.get_wgnode(name) or {}
            except kube.KubeError:
                continue
            if _armed_for(obj, now):
                print(f"node {name}: armed")
                waiting.discard(name)
        if waiting:
            time.sleep(0.5)
    if waiting:
        print(
            f"not armed within {args.timeout:.0f} s: {', '.join(sorted(waiting))}; their "
            "agents will leave podwire's devices, routes and rules on those nodes (see the "
            "chart's README, Uninstalling)",
            file=sys.stderr,
        )
    return 0


def _armed_for(obj: dict[str, Any], request: str) -> bool:
    """Whether the WireguardNode's agent acknowledged this request (not an earlier one)."""
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == wgnode.UNINSTALL_ARMED:
            return c.get("status") == "True" and request in str(c.get("message", ""))
    return False


def _rotate_key(args: argparse.Namespace) -> int:
    if not args.node and not args.all:
        return _rotate_here(args.socket)
    from podwire.agent import kube

    path = args.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        client = kube.Client(kubeconfig=path)
        now = wgnode.format_precise_time(time.time())
        if args.all:
            names = [o["metadata"]["name"] for o in client.list_all("wgnodes")[0]]
            for name in names:
                client.patch_wgnode_metadata(
                    name, {"metadata": {"annotations": {wgnode.ROTATION_QUEUED_ANNOTATION: now}}}
                )
            print(f"queued {len(names)} nodes for a rolling rotation by podwire-operator")
            return 0
        before = client.get_wgnode(args.node)
        if before is None:
            print(f"podwire: no WireguardNode {args.node}", file=sys.stderr)
            return 1
        client.patch_wgnode_metadata(
            args.node, {"metadata": {"annotations": {wgnode.ROTATE_ANNOTATION: now}}}
        )
    except (kube.KubeError, OSError) as e:
        print(f"podwire: {e}", file=sys.stderr)
        return 1
    old_key = before["spec"]["publicKey"]
    print(f"asked node {args.node} for a new key (was {old_key})")
    if args.timeout <= 0:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            obj = client.get_wgnode(args.node) or {}
        except kube.KubeError:
            continue
        key = obj.get("spec", {}).get("publicKey")
        rotated = obj.get("status", {}).get("keyRotatedAt")
        if (
            key
            and key != old_key
            and rotated
            and wgnode.parse_time(rotated) >= int(wgnode.parse_time(now))
        ):
            print(f"node {args.node} has a new key: {key}")
            return 0
    print(
        f"podwire: node {args.node} did not rotate within {args.timeout:.0f} s; is its agent "
        "running? `kubectl describe wgnode` shows its Events",
        file=sys.stderr,
    )
    return 1


def _rotate_here(socket_path: str) -> int:
    import grpc

    from podwire.api.podwire.v1 import agent_pb2

    try:
        msg = _stub(socket_path).RotateKey(agent_pb2.RotateKeyRequest(), timeout=30)
    except grpc.RpcError as e:
        print(f"podwire: the agent at {socket_path} did not rotate: {e.details()}", file=sys.stderr)
        return 1
    print(f"new public key: {msg.public_key}")
    return 0


def discover_plugins() -> list[Plugin]:
    """The `register` functions of the installed `podwire.cli` plugins (the sandbox's, in a
    development install). One whose module is not installed is left out: the node's commands
    must work without it."""
    found = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            found.append(ep.load())
        except ImportError:
            continue
    return found


def _stub(socket_path: str) -> Any:
    import grpc

    from podwire.api.podwire.v1 import agent_pb2_grpc

    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return agent_pb2_grpc.AgentStub(channel)


def _age(ts: Any) -> str:
    if not ts.seconds:
        return "never"
    return f"{int(time.time() - ts.seconds)}s ago"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _agent_command(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from podwire.api.podwire.v1 import agent_pb2

    stub = _stub(args.socket)
    try:
        if args.command == "status":
            msg = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        else:
            msg = stub.ListPeers(agent_pb2.ListPeersRequest(), timeout=10)
    except grpc.RpcError as e:
        print(f"podwire: the agent at {args.socket} did not answer: {e.details()}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(
            json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2)
        )
        return 0
    if args.command == "status":
        datapath = agent_pb2.Datapath.Name(msg.datapath).removeprefix("DATAPATH_").lower()
        print(f"node:        {msg.node_name}")
        print(f"public key:  {msg.public_key}")
        print(f"device:      {msg.device} ({datapath}), listen port {msg.listen_port}")
        if msg.lanes:
            print(f"lanes:       {len(msg.lanes)}")
            for lane in msg.lanes:
                print(
                    f"  {lane.index}: {lane.device}, listen port {lane.listen_port}, {lane.public_key}"
                )
        print(f"features:    {', '.join(msg.features) or '-'}")
        print(
            f"watches:     nodes {'synced' if msg.nodes_synced else 'syncing'}, wgnodes {'synced' if msg.wgnodes_synced else 'syncing'}"
        )
        print(f"peers:       {msg.peer_count}")
        print(
            f"reconciled:  {_age(msg.last_reconcile)}{' error: ' + msg.last_reconcile_error if msg.last_reconcile_error else ''}"
        )
        print(f"mtu:         {msg.mtu or '-'}")
        print(f"key made:    {_age(msg.key_rotated_at)}")
        conditions = ", ".join(f"{c.type}={c.status}" for c in msg.conditions)
        print(f"conditions:  {conditions or '-'}")
        print(f"advisories:  {len(msg.advisories) or '-'}")
        for adv in msg.advisories:
            print(f"  {adv.name}: {adv.message}")
        print("components:")
        rows = [["  NAME", "OK", "HEALTH"]]
        rows += [[f"  {c.name}", "yes" if c.ok else "no", c.message] for c in msg.components]
        print(_table(rows))
        return 0
    lanes = any(p.lane for p in msg.peers)  # a LANE column only where there are lanes
    rows = [["NODE", *(["LANE"] if lanes else []), "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS"]]
    rows[0] += ["HANDSHAKE", "RX", "TX"]
    for p in msg.peers:
        rows.append(
            [
                p.node_name or "-",
                *([str(p.lane)] if lanes else []),
                p.public_key,
                p.endpoint or "-",
                ",".join(p.allowed_ips),
                _age(p.last_handshake),
                str(p.rx_bytes),
                str(p.tx_bytes),
            ]
        )
    print(_table(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
