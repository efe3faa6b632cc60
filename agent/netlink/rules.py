"""podwire's policy-routing rules, for strictMode: they make podwire's routes win over any other.

Two kinds, told apart from everyone else's by their priority (a rule has no owner field that
every kernel keeps):
- LOOKUP: traffic to a cluster pod CIDR looks up podwire's own table before the main table, so
  no other program's more specific route in main can take a remote pod's traffic past the
  device.
- INBOUND: a packet that arrives on the underlay with a source in the cluster's pod range and a
  local pod for destination is dropped: a remote pod's traffic arrives decrypted from the
  device, so one in clear on the underlay is forged, or sent around the tunnel.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import ipaddress
import socket
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError

from podwire.agent import wgdevice
from podwire.agent.netlink import core

# After the local table (0) and the rules of programs that route before everyone (Cilium's
# 9/100, ...), well before main (32766).
INBOUND_PRIORITY: Final = 5200
LOOKUP_PRIORITY: Final = 5210
_PRIORITIES: Final = (INBOUND_PRIORITY, LOOKUP_PRIORITY)
_FR_ACT_TO_TBL: Final = 1
_FR_ACT_BLACKHOLE: Final = 6


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One of podwire's rules: a lookup of `table`, or (table 0) a blackhole."""

    priority: int
    dst: wgdevice.IPNetwork
    src: wgdevice.IPNetwork | None = None
    iif: str | None = None
    table: int = 0

    def __str__(self) -> str:
        src = f"from {self.src} " if self.src else ""
        iif = f"iif {self.iif} " if self.iif else ""
        action = f"lookup {self.table}" if self.table else "blackhole"
        return f"{self.priority}: {src}{iif}to {self.dst} {action}"


def lookup(dst: wgdevice.IPNetwork, table: int) -> Rule:
    return Rule(LOOKUP_PRIORITY, dst, table=table)


def inbound(src: wgdevice.IPNetwork, dst: wgdevice.IPNetwork, iif: str) -> Rule:
    return Rule(INBOUND_PRIORITY, dst, src=src, iif=iif)


def list_rules(*, netns: str | None = None) -> list[Rule]:
    """podwire's rules (by their priorities), both families."""
    out: list[Rule] = []
    with core.errors("list rules"), core.iproute(netns) as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_rules(family=family):
                rule = _parse(msg)
                if rule is not None:
                    out.append(rule)
    return out


def add_rules(rules: list[Rule], *, netns: str | None = None) -> None:
    with core.iproute(netns) as ipr:
        for rule in rules:
            with core.errors(f"add rule {rule}"):
                try:
                    ipr.rule("add", **_spec(rule))
                except PrNetlinkError as exc:
                    if exc.code != errno_mod.EEXIST:  # there already is the goal
                        raise


def remove_rules(rules: list[Rule], *, netns: str | None = None) -> None:
    with core.iproute(netns) as ipr:
        for rule in rules:
            with core.errors(f"remove rule {rule}"):
                try:
                    ipr.rule("del", **_spec(rule))
                except PrNetlinkError as exc:
                    if exc.code not in (errno_mod.ENOENT, errno_mod.ESRCH):
                        raise


def _spec(rule: Rule) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "family": socket.AF_INET6 if rule.dst.version == 6 else socket.AF_INET,
        "priority": rule.priority,
        "dst": str(rule.dst.network_address),
        "dst_len": rule.dst.prefixlen,
    }
    if rule.src is not None:
        spec.update(src=str(rule.src.network_address), src_len=rule.src.prefixlen)
    if rule.iif is not None:
        spec["iifname"] = rule.iif
    if rule.table:
        spec["table"] = rule.table
    else:
        spec["action"] = "FR_ACT_BLACKHOLE"
    return spec


def _parse(msg: Any) -> Rule | None:
    priority = msg.get_attr("FRA_PRIORITY")
    dst = msg.get_attr("FRA_DST")
    if priority not in _PRIORITIES or dst is None:
        return None
    if msg["action"] not in (_FR_ACT_TO_TBL, _FR_ACT_BLACKHOLE):
        return None
    src = msg.get_attr("FRA_SRC")
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    return Rule(
        priority=int(priority),
        dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}"),
        src=ipaddress.ip_network(f"{src}/{msg['src_len']}") if src else None,
        iif=msg.get_attr("FRA_IIFNAME"),
        table=int(table) if msg["action"] == _FR_ACT_TO_TBL else 0,
    )
