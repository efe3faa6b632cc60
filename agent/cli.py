"""`podwire`: the command line for operators of a node and of the sandbox."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_SOCKET = "/var/run/podwire/agent.sock"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podwire", description="podwire: WireGuard for pod traffic")
    sub = p.add_subparsers(dest="command", required=True)
    sb = sub.add_parser("sandbox", help="a whole podwire cluster on this machine")
    sbsub = sb.add_subparsers(dest="action", required=True)
    up = sbsub.add_parser("up", help="start the sandbox")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--datapath", choices=["auto", "userspace", "kernel"], default="auto")
    sbsub.add_parser("down", help="remove everything the sandbox made")
    st = sbsub.add_parser("status", help="nodes, peers, handshakes, which pod reaches which")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    vf = sbsub.add_parser("verify", help="prove from an underlay capture that traffic is encrypted")
    vf.add_argument("-o", "--output", choices=["text", "json"], default="text")
    for name, text in (
        ("status", "this node's agent: key, datapath, sync"),
        ("peers", "the peers on the device"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("-o", "--output", choices=["table", "json"], default="table")
        c.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's API socket")
    return p


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
        print(f"features:    {', '.join(msg.features) or '-'}")
        print(
            f"watches:     nodes {'synced' if msg.nodes_synced else 'syncing'}, wgnodes {'synced' if msg.wgnodes_synced else 'syncing'}"
        )
        print(f"peers:       {msg.peer_count}")
        print(
            f"reconciled:  {_age(msg.last_reconcile)}{' error: ' + msg.last_reconcile_error if msg.last_reconcile_error else ''}"
        )
        return 0
    rows = [["NODE", "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"]]
    for p in msg.peers:
        rows.append(
            [
                p.node_name or "-",
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
    if args.command in ("status", "peers"):
        return _agent_command(args)
    if args.command == "sandbox":
        return _sandbox_command(args)
    return 0


def _sandbox_command(args: argparse.Namespace) -> int:
    # Imported here: the sandbox pulls in the control plane's tooling, which a node's
    # `podwire status` never needs.
    from podwire.sandbox import cluster, verify
    from podwire.sandbox import status as status_mod

    sandbox = cluster.Sandbox()
    try:
        if args.action == "up":
            sandbox.up(nodes=args.nodes, datapath=args.datapath)
        elif args.action == "down":
            sandbox.down()
        elif args.action == "verify":
            as_json = args.output == "json"
            report = verify.verify(sandbox.load(), out=sys.stderr if as_json else sys.stdout)
            if as_json:
                print(json.dumps(report.to_dict(), indent=2, default=str))
            return 0 if report.passed else 1
        else:
            status = sandbox.status()
            status_mod.render(status, as_json=args.output == "json")
            if "kubeconfig" not in status:
                return 1
    except (cluster.SandboxError, verify.VerifyError) as e:
        print(f"podwire sandbox {args.action}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"podwire sandbox {args.action}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
