"""The errors of every netlink call, and the internals the package's modules share.

Each module opens its own rtnetlink socket per call through `iproute`, wraps the request in
`errors` so that callers see one exception type whatever pyroute2 or the kernel raised, and finds
links by name with `index`. They live here so that each concern's module says only what it asks
of the kernel; they are the package's internals, not the agent's API.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError


class NetlinkError(Exception):
    """A netlink request failed: `operation` says what was asked, `errno` the kernel's answer."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        reason = detail or errno_mod.errorcode.get(errno, str(errno))
        super().__init__(f"{operation}: {reason} (errno {errno})")
        self.operation = operation
        self.errno = errno


class KernelWireguardUnavailable(NetlinkError):
    """This kernel cannot create a WireGuard link; the `auto` datapath falls back to userspace."""


@contextlib.contextmanager
def iproute(netns: str | None, *, strict_check: bool = False) -> Iterator[Any]:
    """An rtnetlink socket in netns (None: the agent's own), closed on exit.

    strict_check: the kernel honours the fields of a dump request as a filter, so a dump of
    a few routes among thousands costs the few (NETLINK_GET_STRICT_CHK, Linux 4.20).
    """
    # flags=0: never create a namespace that is not there (pyroute2's default is O_CREAT).
    ipr = (
        IPRoute(netns=netns, flags=0, strict_check=strict_check)
        if netns
        else IPRoute(strict_check=strict_check)
    )
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def errors(operation: str) -> Iterator[None]:
    """Raises NetlinkError, saying what operation was asked, for whatever the request raised."""
    try:
        yield
    except PrNetlinkError as exc:
        raise NetlinkError(operation, exc.code or errno_mod.EIO, str(exc.args[-1])) from None
    except OSError as exc:
        raise NetlinkError(operation, exc.errno or errno_mod.EIO, exc.strerror or "") from None


def index(ipr: Any, device: str) -> int:
    """The ifindex of device, or NetlinkError(ENODEV) when there is no such link."""
    found = ipr.link_lookup(ifname=device)
    if not found:
        raise NetlinkError(f"find link {device}", errno_mod.ENODEV, "no such device")
    return int(found[0])
