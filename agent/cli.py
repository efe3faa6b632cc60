"""`podwire`: the command line for operators of a node and of the sandbox."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podwire", description="podwire: WireGuard for pod traffic")
    sub = p.add_subparsers(dest="command", required=True)
    sb = sub.add_parser("sandbox", help="a whole podwire cluster on this machine")
    sbsub = sb.add_subparsers(dest="action", required=True)
    up = sbsub.add_parser("up", help="start the sandbox")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--datapath", choices=["auto", "userspace", "kernel"], default="auto")
    sbsub.add_parser("down", help="remove everything the sandbox made")
    st = sbsub.add_parser("status", help="what runs and how to reach it")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sandbox":
        # Imported here: the sandbox pulls in the control plane's tooling, which a node's
        # `podwire status` never needs.
        from podwire.sandbox import cluster

        sandbox = cluster.Sandbox()
        try:
            if args.action == "up":
                sandbox.up()
            elif args.action == "down":
                sandbox.down()
            else:
                cluster.print_status(sandbox.status(), as_json=args.output == "json")
        except cluster.SandboxError as e:
            print(f"podwire: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
