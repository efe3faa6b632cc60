"""A fan-out of the agent's events to every `podwire` CLI that streams them (WatchEvents)."""

from __future__ import annotations

import dataclasses
import queue
import threading

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
