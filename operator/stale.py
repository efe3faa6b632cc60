"""Which WireguardNodes have lost their Node: pure, the grace measured on a clock passed in.

The garbage collector removes a WireguardNode with its Node through the ownerReference, but a
test bed runs no collector and a hand-made object may have no reference; either way a stale
WireguardNode keeps its key and pod CIDRs claimed. A Node that is deleted and created again
under the same name (a machine replaced) must not lose its WireguardNode, so a Node has to be
absent for a grace before its WireguardNode goes.
"""

from __future__ import annotations

from collections.abc import Iterable


class StaleTracker:
    """Remembers since when each WireguardNode's Node has been missing."""

    def __init__(self, *, grace: float) -> None:
        self.grace = grace
        self.absent_since: dict[str, float] = {}

    def update(self, wgnodes: Iterable[str], nodes: Iterable[str], *, now: float) -> list[str]:
        """The WireguardNodes whose Node has been absent for the grace, by name; call it with
        the names of complete (synced) lists only."""
        present = set(nodes)
        missing = set(wgnodes) - present
        self.absent_since = {n: self.absent_since.get(n, now) for n in missing}
        return sorted(n for n, since in self.absent_since.items() if now - since >= self.grace)

    def forget(self) -> None:
        """Start counting afresh (a new leader has not watched the absence itself)."""
        self.absent_since.clear()
