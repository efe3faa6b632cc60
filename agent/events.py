"""The agent's events: recorded once, fanned out to every `podwire` CLI that streams them
(WatchEvents), and, when they concern an object, recorded as Kubernetes Events on it."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from podwire.agent import log

QUEUE_LENGTH = 256  # a slow reader loses old events rather than slowing the agent


@dataclasses.dataclass(frozen=True)
class Event:
    wall: float
    type: str  # Normal or Warning, as Kubernetes Events
    reason: str
    message: str
    node: str


class Broadcaster:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[Event]] = []

    def subscribe(self) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(QUEUE_LENGTH)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(event)
            except queue.Full:
                try:
                    q.get_nowait()
                    q.put_nowait(event)
                except (queue.Empty, queue.Full):
                    pass


class Recorder:
    """Where the agent's components report what happened: the local stream, and Kubernetes.

    Every event goes to the `podwire` CLIs that stream them; one about an object (a refused
    peer's WireguardNode, this node's own) is also recorded as a Kubernetes Event on it, so
    `kubectl describe` shows it. A failure to record one is logged, never raised: an Event is
    worth less than the pass that produced it.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        *,
        emit: Callable[..., object] | None = None,
        wall: Callable[[], float],
    ) -> None:
        self.broadcaster = broadcaster
        self._emit = emit
        self._wall = wall
        self._log = log.get("events")

    def record(
        self,
        type: str,
        reason: str,
        message: str,
        *,
        node: str = "",
        involved: Mapping[str, Any] | None = None,
    ) -> None:
        self.broadcaster.publish(Event(self._wall(), type, reason, message, node))
        if involved is None or self._emit is None:
            return
        try:
            self._emit(involved=involved, reason=reason, message=message, event_type=type)
        except Exception as e:  # the apiserver away, or the Event refused
            self._log.warning("event_failed", reason=reason, error=str(e))
