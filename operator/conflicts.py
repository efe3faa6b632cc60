"""Duplicate public keys and overlapping pod CIDRs across WireguardNodes: pure.

Agents refuse such peers (each on its own); the operator says so on the objects involved, once
for the whole cluster, so `kubectl get wgnodes -o yaml` shows which nodes clash and with whom.
The pod CIDRs are the Node's spec.podCIDRs, what every agent programs as the node's
allowed-ips (podwire.agent.reconcile.pod_cidrs); a WireguardNode whose Node is gone has none.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from podwire.agent import reconcile

DUPLICATE_KEY: Final = "DuplicateKey"
OVERLAPPING_POD_CIDR: Final = "OverlappingPodCIDR"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class Conflict:
    """What one WireguardNode clashes on, and with which nodes."""

    reason: str  # DuplicateKey when its key clashes (the graver), else OverlappingPodCIDR
    others: tuple[str, ...]
    message: str


def find(
    wgnodes: Iterable[Mapping[str, Any]], nodes: Iterable[Mapping[str, Any]]
) -> dict[str, Conflict]:
    """Every WireguardNode in a conflict, by name; the others are not in the answer."""
    wg = [o for o in wgnodes if _name(o)]
    wg_names = {_name(o) for o in wg}
    cidrs = {_name(n): reconcile.pod_cidrs(n) for n in nodes if _name(n) in wg_names}
    keys = duplicate_keys({_name(o): _public_key(o) for o in wg})
    overlaps = overlapping(cidrs)
    out: dict[str, Conflict] = {}
    for name in sorted(set(keys) | set(overlaps)):
        lines = [f"public key also published by {', '.join(keys[name])}"] if name in keys else []
        lines += [
            f"pod CIDR {mine} overlaps {theirs} of {other}"
            for mine, theirs, other in overlaps.get(name, ())
        ]
        others = sorted(set(keys.get(name, ())) | {o for _, _, o in overlaps.get(name, ())})
        reason = DUPLICATE_KEY if name in keys else OVERLAPPING_POD_CIDR
        out[name] = Conflict(reason, tuple(others), "; ".join(lines))
    return out


def duplicate_keys(keys: Mapping[str, str | None]) -> dict[str, list[str]]:
    """For each node whose key another node also publishes: those other nodes."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for name, key in keys.items():
        if key:
            by_key[key].append(name)
    out: dict[str, list[str]] = {}
    for names in by_key.values():
        for name in names if len(names) > 1 else ():
            out[name] = sorted(n for n in names if n != name)
    return out


def overlapping(cidrs: Mapping[str, Sequence[Network]]) -> dict[str, list[tuple[str, str, str]]]:
    """For each node with a pod CIDR that overlaps another node's: (its CIDR, the other's, the
    other node). Two CIDRs overlap only when one contains the other, so a sweep in address
    order, keeping the CIDRs that still cover the current address, finds every pair in
    O(n log n + pairs)."""
    owned = sorted(
        ((net, name) for name, nets in cidrs.items() for net in nets),
        key=lambda item: (item[0].version, int(item[0].network_address), item[0].prefixlen),
    )
    found: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    open_: list[tuple[Network, str]] = []
    for net, name in owned:
        open_ = [
            (o, n)
            for o, n in open_
            if o.version == net.version and int(o.broadcast_address) >= int(net.network_address)
        ]
        for outer, other in open_:
            if other != name:
                found[name].add((str(net), str(outer), other))
                found[other].add((str(outer), str(net), name))
        open_.append((net, name))
    return {name: sorted(pairs) for name, pairs in found.items()}


def _name(obj: Mapping[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name")
    return name if isinstance(name, str) else ""


def _public_key(obj: Mapping[str, Any]) -> str | None:
    key = (obj.get("spec") or {}).get("publicKey")
    return key if isinstance(key, str) and key else None
