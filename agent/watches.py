"""The agent's two watches, Nodes and WireguardNodes, as one component.

A source keeps a local copy of one kind of object current (in the cluster: `kube.Informer`,
list then watch, relist on 410, resync; in unit tests: an in-memory source) and calls
`on_change` after each change. The reconciler reads the copies level-triggered; `synced` says
whether it may trust their absences, which is what removing a peer needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from podwire.agent import component

Obj = dict[str, Any]


class Source(Protocol):
    kind: str
    synced: bool  # listed at least once
    last_error: str  # the last failure to watch; "" while the watch is healthy
    restarts: int

    @property
    def objects(self) -> Mapping[str, Obj]: ...

    def snapshot(self) -> list[Obj]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Watches:
    name = "watches"

    def __init__(self, nodes: Source, wgnodes: Source) -> None:
        self.nodes = nodes
        self.wgnodes = wgnodes

    @property
    def synced(self) -> bool:
        """Both listed, and both watching now: absences in the copies can be trusted."""
        return all(s.synced and not s.last_error for s in (self.nodes, self.wgnodes))

    @property
    def restarts(self) -> int:
        return self.nodes.restarts + self.wgnodes.restarts

    def node(self, name: str) -> Obj | None:
        return self.nodes.objects.get(name)

    def wgnode(self, name: str) -> Obj | None:
        return self.wgnodes.objects.get(name)

    def start(self) -> None:
        self.nodes.start()
        self.wgnodes.start()

    def stop(self) -> None:
        self.nodes.stop()
        self.wgnodes.stop()

    def health(self) -> component.Health:
        parts = []
        for s in (self.nodes, self.wgnodes):
            if s.last_error:
                parts.append(f"{s.kind}: {s.last_error}")
            elif not s.synced:
                parts.append(f"{s.kind}: listing")
            else:
                parts.append(f"{s.kind}: {len(s.objects)} watched")
        text = "; ".join(parts)
        return component.ok(text) if self.synced else component.degraded(text)
