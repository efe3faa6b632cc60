"""Clocks passed into code that measures time, so tests can move time by hand.

Protocol and reconcile code never reads the system clock itself; it is given a Clock (or the
current time as a number). MonotonicClock is the real one; FakeClock is for tests.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for timers and ages."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch; for timestamps a peer or a user reads."""
        ...


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """Starts at a fixed point in time and moves only when advance() is called."""

    def __init__(self, *, start_monotonic: float = 1000.0, start_wall: float = 1_767_225_600.0):
        self._mono = start_monotonic
        self._wall = start_wall

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
        self._wall += seconds
