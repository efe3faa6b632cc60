"""`podwire sandbox up|down|status|verify`: the sandbox's part of the `podwire` command.

A plugin of podwire.agent.cli, found through the `podwire.cli` entry point group, so that the
node's own commands (`podwire status`, `podwire peers`) never import the sandbox and work in an
image that does not ship it. Nothing heavy is imported until an action runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Adds `sandbox` and its actions to the `podwire` parser's subcommands."""
    sb = commands.add_parser("sandbox", help="a whole podwire cluster on this machine")
    sb.set_defaults(handler=run)
    actions = sb.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start the sandbox")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--datapath", choices=["auto", "userspace", "kernel"], default="auto")
    up.add_argument(
        "--runtime",
        choices=["process", "kubelet"],
        default="kubelet",
        help="kubelet (the default): real nodes, containerd and a kubelet each, pods as "
        "containers, podwire installed with helm; process: agents as processes, pods as "
        "namespaces (fast, for tests)",
    )
    actions.add_parser("down", help="remove everything the sandbox made")
    st = actions.add_parser("status", help="nodes, peers, handshakes, which pod reaches which")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    vf = actions.add_parser(
        "verify", help="prove from an underlay capture that traffic is encrypted"
    )
    vf.add_argument("-o", "--output", choices=["text", "json"], default="text")


def run(args: argparse.Namespace) -> int:
    from podwire.sandbox import cluster, verify
    from podwire.sandbox import status as status_mod

    sandbox = cluster.Sandbox()
    try:
        if args.action == "up":
            sandbox.up(nodes=args.nodes, datapath=args.datapath, runtime=args.runtime)
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
