"""The rolling key rotation, one node at a time: pure, it reads objects and returns actions.

All its state lives on the WireguardNodes, so a new leader carries on where the last one
stopped:
- `podwire.io/rotation-queued-at` (set by `podwire rotate-key --all`, or by us when a key is
  older than keyRotationInterval) puts a node in the queue, oldest first, then by name.
- `podwire.io/rotate-key-requested-at` set no earlier than the queue time means we started the
  node's rotation at that time; its agent then rotates.
- The rotation is complete when the agent's status.keyRotatedAt is no earlier than the request
  and status.peersOnCurrentKey equals status.peers: every peer has completed a handshake with
  the new key. Then the queue annotation goes, and the next node starts.
- A node that is not complete within the deadline is reported and leaves the queue; if its
  agent had not rotated yet, the request is withdrawn too, so that an agent that comes back
  later does not rotate while another node does. A node that timed out is not queued by the
  schedule again for one interval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from podwire.api import wgnode
from podwire.operator import election

QUEUE_ANNOTATION: Final = wgnode.ROTATION_QUEUED_ANNOTATION
REQUEST_ANNOTATION: Final = wgnode.ROTATE_ANNOTATION
CONDITION: Final = "KeyRotation"
IN_PROGRESS, COMPLETED, DEADLINE = "InProgress", "Completed", "Deadline"

Kind = Literal["queue", "start", "done", "timed_out"]


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """What the rotation reads of one WireguardNode; times are epoch seconds."""

    name: str
    queued_at: float | None = None
    requested_at: float | None = None
    rotated_at: float | None = None
    created_at: float | None = None
    peers: int | None = None
    peers_on_current_key: int | None = None
    timed_out_at: float | None = None  # when its last rotation ran past the deadline

    @property
    def in_progress(self) -> bool:
        return (
            self.queued_at is not None
            and self.requested_at is not None
            and self.requested_at >= self.queued_at
        )

    @property
    def rotated(self) -> bool:
        """Its agent has a key from no earlier than the request."""
        return (
            self.requested_at is not None
            and self.rotated_at is not None
            and self.rotated_at >= self.requested_at
        )

    @property
    def complete(self) -> bool:
        return (
            self.rotated
            and self.peers is not None
            and self.peers_on_current_key is not None
            and self.peers_on_current_key >= self.peers
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    name: str
    message: str = ""
    withdraw: bool = False  # timed_out: remove the request too (the agent has not rotated)


def read(obj: Mapping[str, Any]) -> Node:
    """The rotation's view of a WireguardNode as the apiserver sends it; tolerant of any shape:
    a field it cannot read counts as absent."""
    meta = obj.get("metadata") or {}
    notes = meta.get("annotations") or {}
    status = obj.get("status") or {}
    queued = notes.get(QUEUE_ANNOTATION)
    return Node(
        name=str(meta.get("name", "")),
        # A queue mark we cannot read still queues the node: first, as if queued long ago.
        queued_at=None if queued is None else (election.parse_time(queued) or 0.0),
        requested_at=election.parse_time(notes.get(REQUEST_ANNOTATION)),
        rotated_at=election.parse_time(status.get("keyRotatedAt")),
        created_at=election.parse_time(meta.get("creationTimestamp")),
        peers=_count(status.get("peers")),
        peers_on_current_key=_count(status.get("peersOnCurrentKey")),
        timed_out_at=_timed_out_at(status.get("conditions")),
    )


def plan(nodes: Iterable[Node], *, now: float, deadline: float, interval: float) -> list[Action]:
    """What to do now: finish or time out the rotation in progress, queue keys that are due,
    and start the next node when none is in progress."""
    nodes = list(nodes)
    actions: list[Action] = []
    busy = False
    for node in (n for n in nodes if n.in_progress):
        if node.complete:
            actions.append(Action("done", node.name, _done_message(node)))
        elif node.requested_at is not None and now >= node.requested_at + deadline:
            actions.append(_timed_out(node, deadline))
        else:
            busy = True
    due = [n for n in nodes if interval > 0 and _due(n, now=now, interval=interval)]
    actions += [Action("queue", n.name, _due_message(n, now)) for n in due]
    waiting = [n for n in nodes if n.queued_at is not None and not n.in_progress]
    waiting += [dataclasses.replace(n, queued_at=now) for n in due]
    if not busy and waiting:
        first = queue_order(waiting)[0]
        actions.append(Action("start", first.name, "key rotation requested"))
    return actions


def queue_order(nodes: Sequence[Node]) -> list[Node]:
    """First queued first; the same second, by name."""
    return sorted(nodes, key=lambda n: (n.queued_at or 0.0, n.name))


def _due(node: Node, *, now: float, interval: float) -> bool:
    if node.queued_at is not None:
        return False
    if node.timed_out_at is not None and now - node.timed_out_at < interval:
        return False
    if node.requested_at is not None and not node.rotated and now - node.requested_at < interval:
        return False  # somebody asked already; its agent is on it
    basis = node.rotated_at if node.rotated_at is not None else node.created_at
    return basis is not None and now - basis >= interval


def _timed_out(node: Node, deadline: float) -> Action:
    if not node.rotated:
        why = "its agent has not rotated its key"
    else:
        why = f"{node.peers_on_current_key or 0} of {node.peers} peers have a handshake on the new key"
    return Action(
        "timed_out",
        node.name,
        f"key rotation requested at {wgnode.format_time(node.requested_at or 0)} did not"
        f" complete within {deadline:g}s: {why}; skipped",
        withdraw=not node.rotated,
    )


def _done_message(node: Node) -> str:
    return (
        f"key rotated at {wgnode.format_time(node.rotated_at or 0)};"
        f" all {node.peers} peers have a handshake on the new key"
    )


def _due_message(node: Node, now: float) -> str:
    basis = node.rotated_at if node.rotated_at is not None else node.created_at
    return f"key is {now - (basis or now):.0f}s old: scheduled rotation"


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _timed_out_at(conditions: object) -> float | None:
    for cond in conditions if isinstance(conditions, list) else ():
        if (
            isinstance(cond, Mapping)
            and cond.get("type") == CONDITION
            and cond.get("status") == "False"
            and cond.get("reason") == DEADLINE
        ):
            return election.parse_time(cond.get("lastTransitionTime"))
    return None
