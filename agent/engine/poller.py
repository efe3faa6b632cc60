"""The engine's readiness loop over epoll: `selectors` without the layers a lone packet pays for.

selectors.DefaultSelector wraps each ready descriptor in a SelectorKey looked up through two
mappings and rounds the timeout through a float division on every call. A lone packet's wakeup
(a ping through an idle tunnel) runs that code cold, and a profile of the round trip showed
every such layer in it. This keeps one map, descriptor to (events, callback), and returns the
callbacks themselves; the engine registers sockets and the TUN descriptor, never anything that
closes without being unregistered first.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Protocol

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
# What epoll reports beside what was asked: a hang-up or error wakes a reader (its next read
# says what happened), and a writer.
_WAKES_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WAKES_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

Callback = Callable[[int], None]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def _fd(target: int | HasFileno) -> int:
    return target if isinstance(target, int) else target.fileno()


class Poller:
    """Descriptors watched for READ and/or WRITE, each with the callback that gets the mask
    (READ | WRITE as they apply) when it is ready."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[int, Callback]] = {}

    def register(self, target: int | HasFileno, events: int, callback: Callback) -> None:
        fd = _fd(target)
        if fd in self._watched:
            raise KeyError(f"descriptor {fd} is already registered")
        self._epoll.register(fd, events)
        self._watched[fd] = (events, callback)

    def modify(self, target: int | HasFileno, events: int) -> None:
        """Watches target for events from now on, with the callback it has."""
        fd = _fd(target)
        wanted, callback = self._watched[fd]
        if wanted != events:
            self._epoll.modify(fd, events)
            self._watched[fd] = (events, callback)

    def unregister(self, target: int | HasFileno) -> None:
        fd = _fd(target)
        del self._watched[fd]
        self._epoll.unregister(fd)

    def events(self, target: int | HasFileno) -> int:
        """What target is watched for; KeyError if it is not."""
        return self._watched[_fd(target)][0]

    def __contains__(self, target: int | HasFileno) -> bool:
        return _fd(target) in self._watched

    def poll(self, timeout: float) -> list[tuple[Callback, int]]:
        """The callbacks of what is ready within timeout seconds (< 0: no limit), with the
        events that apply to each; [] on timeout. As with selectors, the list is made before
        any callback runs: one that unregisters another descriptor must expect its callback
        may still run this round."""
        # epoll.poll rounds a timeout up to whole milliseconds and retries after a signal.
        ready = self._epoll.poll(timeout, len(self._watched) or 1)
        watched = self._watched
        out = []
        for fd, happened in ready:
            entry = watched.get(fd)
            if entry is None:
                continue
            wanted, callback = entry
            mask = 0
            if happened & _WAKES_READ:
                mask |= wanted & READ
            if happened & _WAKES_WRITE:
                mask |= wanted & WRITE
            if mask:
                out.append((callback, mask))
        return out

    def close(self) -> None:
        self._epoll.close()
        self._watched.clear()
