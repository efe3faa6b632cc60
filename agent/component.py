"""What every part of the agent is: a component with a start, a stop and a health line.

In the spirit of Cilium's cells, kept Python and small: each component takes its configuration
and what it needs in its constructor (assembled in one place, `app.build`), starts and stops,
and says how it is. The health lines feed `/readyz` and `podwire status`, so an operator sees
which part of an agent that is not ready is waiting, and for what.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    message: str


def ok(message: str) -> Health:
    return Health(True, message)


def degraded(message: str) -> Health:
    return Health(False, message)


class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> Health: ...
