"""Reading what podwire-engine wrote to its log (one JSON object a line), for the tests."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def events(log: pathlib.Path, name: str) -> list[dict[str, Any]]:
    """The engine's log events called `name`, in order; lines that are not JSON are skipped."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found
