"""The node's multipath hash: by layer 4, so that a flow keeps its lane and flows spread.

A multipath route (one nexthop per lane's device) sends each packet down the nexthop its hash
picks. The default hash (policy 0) covers the addresses only, so every flow between two pods
would take one lane; policy 1 adds the protocol and ports. Both settings live in the network
namespace (/proc/sys/net is the namespace of whoever reads it), so the agent sets them where
its devices are and leaves them set: the multipath routes stay when the agent restarts.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import Final

from pyroute2 import netns as pr_netns

L4: Final = 1  # fib_multipath_hash_policy: layer 4 (addresses, protocol, ports)
SETTINGS: Final = (
    "net/ipv4/fib_multipath_hash_policy",
    "net/ipv6/fib_multipath_hash_policy",
)


def hash_by_flow(*, netns: str | None = None) -> dict[str, int]:
    """Sets every family's multipath hash to layer 4 in netns; what each was before (a family
    the kernel lacks is left out)."""
    before: dict[str, int] = {}
    with _inside(netns):
        for name in SETTINGS:
            value = _read(name)
            if value is None:
                continue
            before[name] = value
            if value != L4:
                _write(name, L4)
    return before


def read(*, netns: str | None = None) -> dict[str, int]:
    """Every family's multipath hash policy in netns."""
    with _inside(netns):
        return {name: v for name in SETTINGS if (v := _read(name)) is not None}


def restore(values: dict[str, int], *, netns: str | None = None) -> None:
    """Puts back what `hash_by_flow` found (for tests and tools that set it for a while)."""
    with _inside(netns):
        for name, value in values.items():
            _write(name, value)


def _read(name: str) -> int | None:
    try:
        return int((pathlib.Path("/proc/sys") / name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _write(name: str, value: int) -> None:
    (pathlib.Path("/proc/sys") / name).write_text(f"{value}\n")


@contextlib.contextmanager
def _inside(netns: str | None) -> Iterator[None]:
    # setns moves only this thread; it comes straight back. flags=0: never create one.
    if netns is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(netns, flags=0)
        try:
            yield
        finally:
            pr_netns.setns(home, flags=0)
    finally:
        os.close(home)
