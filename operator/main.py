"""`podwire-operator`: the cluster operator's entry point.

The operator (stale WireguardNode removal, conflict flags, scheduled key rotation) comes with
its own issue; until then this says so plainly instead of pretending to run.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "podwire-operator: not built yet; the agents work without it "
        "(stale WireguardNodes are not collected until it exists)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
