"""What the WireGuard device should hold, and the smallest change that gets it there.

The agent is level-triggered: whatever event woke it, it recomputes the desired peers from
the Nodes and WireguardNodes it has cached, reads the device back, and applies the difference.
All of that thinking lives here, pure (no I/O, no clock, no kubernetes import), so it is tested
on tables of plain dicts and the backends that touch the kernel stay thin.

Trust: a peer's allowed-ips (what it may send us, and what we route to it) come from the Node
object, which the control plane writes, never from the WireguardNode a node writes about itself.
A public key or pod CIDR that two nodes claim cannot be given to both without one capturing
the other's traffic, so every node involved is refused and reported, and the rest go on.

Removal is the dangerous direction: a peer missing from a half-filled cache is not a peer that
left. Nothing is removed unless the caller says both watches have listed (`synced=True`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

from podwire.api import wgnode

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refusal reasons: CamelCase, so they can be an Event's and a condition's reason as they are.
DUPLICATE_PUBLIC_KEY: Final = "DuplicatePublicKey"
OVERLAPPING_POD_CIDR: Final = "OverlappingPodCIDR"
MISSING_INTERNAL_IP: Final = "MissingInternalIP"
MISSING_POD_CIDRS: Final = "MissingPodCIDRs"
INVALID_POD_CIDR: Final = "InvalidPodCIDR"
INVALID_PUBLIC_KEY: Final = "InvalidPublicKey"
INVALID_WIREGUARD_NODE: Final = "InvalidWireguardNode"

# WireGuard's overhead on the underlay: outer IP header, UDP 8, WireGuard data header 16
# (type, receiver index, counter), Poly1305 tag 16.
OVERHEAD_IPV4: Final = 20 + 8 + 16 + 16
OVERHEAD_IPV6: Final = 40 + 8 + 16 + 16
_MIN_INNER_MTU: Final = 576


class Endpoint(NamedTuple):
    """Where a peer's WireGuard listens: a normalized IP address and a UDP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def make_endpoint(address: str | IPAddress, port: int) -> Endpoint:
    """An Endpoint whose host is normalized, so the desired and the read-back ones compare."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return Endpoint(str(ip), port)


def parse_endpoint(text: str) -> Endpoint:
    """Parse `1.2.3.4:51871` or `[fd00::1]:51871` (the form `wg` and the UAPI print)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not an endpoint (address:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1].split("%", 1)[0]  # a scope id is the kernel's business, not ours
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 endpoint needs brackets, as in [fd00::1]:51871")
    return make_endpoint(host, int(port))


@dataclasses.dataclass(frozen=True, slots=True)
class DesiredPeer:
    """A peer the device should hold; allowed_ips sorted, taken from the peer's Node."""

    node: str
    public_key: str
    endpoint: Endpoint
    allowed_ips: tuple[IPNetwork, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ActualPeer:
    """A peer as read back from the device (allowed_ips in any order)."""

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A node that is not programmed, and why; the caller makes it an Event and a condition."""

    node: str
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Desired:
    peers: tuple[DesiredPeer, ...]
    refusals: tuple[Refusal, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PeerUpdate:
    """An existing peer to set again: the full new endpoint and allowed-ips, and what changed."""

    peer: DesiredPeer
    endpoint_changed: bool
    allowed_ips_changed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    add: tuple[DesiredPeer, ...] = ()
    update: tuple[PeerUpdate, ...] = ()
    remove: tuple[str, ...] = ()  # public keys

    @property
    def empty(self) -> bool:
        return not (self.add or self.update or self.remove)


@dataclasses.dataclass(frozen=True, slots=True)
class RoutePlan:
    """Routes through the device to add and remove, by destination."""

    add: tuple[IPNetwork, ...] = ()
    remove: tuple[IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def desired_peers(
    nodes: Iterable[Mapping[str, Any]],
    wgnodes: Iterable[Mapping[str, Any]],
    own_node: str,
    *,
    own_public_key: str | None = None,
) -> Desired:
    """The peers to program from the cached Nodes and WireguardNodes (raw JSON dicts).

    `own_public_key` is the key this agent uses now; without it, the one its WireguardNode
    publishes. A node with no WireguardNode yet is simply not a peer yet; one with a
    WireguardNode but something wrong or contested is refused (possibly for several reasons).
    """
    infos = {info.name: info for info in map(_node_info, nodes) if info is not None}
    specs: dict[str, wgnode.Spec | wgnode.ResourceError] = {}
    for obj in wgnodes:
        name = _wgnode_name(obj)
        if name is not None:
            specs[name] = _parse_spec(obj, name)

    own = infos.get(own_node)
    own_spec = specs.get(own_node)
    if own_public_key is None and isinstance(own_spec, wgnode.Spec):
        own_public_key = own_spec.public_key

    # Only nodes that exist and have published count as peers, and as claimants of a key:
    # a WireguardNode whose Node is gone is garbage the operator collects.
    candidates = sorted(n for n in specs if n != own_node and n in infos)
    refusals: dict[str, list[Refusal]] = defaultdict(list)
    claims: dict[str, list[str]] = defaultdict(list)
    for name in candidates:
        spec = specs[name]
        if isinstance(spec, wgnode.Spec):
            claims[spec.public_key].append(name)
        else:
            reason = (
                INVALID_PUBLIC_KEY if spec.field == "spec.publicKey" else INVALID_WIREGUARD_NODE
            )
            refusals[name].append(Refusal(name, reason, str(spec)))
    _refuse_duplicate_keys(claims, own_node, own_public_key, refusals)
    overlaps = _overlaps(infos.values())

    peers: list[DesiredPeer] = []
    own_family = own.internal_ips[0].version if own and own.internal_ips else None
    for name in candidates:
        info = infos[name]
        refusals[name].extend(_node_refusals(info, overlaps.get(name, ())))
        spec = specs[name]
        if refusals[name] or not isinstance(spec, wgnode.Spec):
            continue
        address = _pick_address(info.internal_ips, own_family)
        peers.append(
            DesiredPeer(
                node=name,
                public_key=spec.public_key,
                endpoint=make_endpoint(address, spec.listen_port),
                allowed_ips=_sorted_networks(info.pod_cidrs),
            )
        )
    flat = sorted(
        (r for rs in refusals.values() for r in rs), key=lambda r: (r.node, r.reason, r.message)
    )
    return Desired(peers=tuple(peers), refusals=tuple(flat))


def plan_peers(
    desired: Iterable[DesiredPeer], actual: Iterable[ActualPeer], *, synced: bool
) -> Plan:
    """The smallest change from the device's `actual` peers to `desired`, keyed by public key.

    Pass `synced=False` until both watches have listed, and while the apiserver cannot be
    reached: the device then only gains and changes peers, it never loses one.
    """
    want = _by_key(desired)
    have = _by_key(actual)
    add: list[DesiredPeer] = []
    update: list[PeerUpdate] = []
    for key, peer in want.items():
        current = have.get(key)
        if current is None:
            add.append(peer)
            continue
        endpoint_changed = current.endpoint != peer.endpoint
        allowed_changed = frozenset(current.allowed_ips) != frozenset(peer.allowed_ips)
        if endpoint_changed or allowed_changed:
            update.append(PeerUpdate(peer, endpoint_changed, allowed_changed))
    remove = sorted(set(have) - set(want)) if synced else []
    return Plan(
        add=tuple(sorted(add, key=_peer_order)),
        update=tuple(sorted(update, key=lambda u: _peer_order(u.peer))),
        remove=tuple(remove),
    )


class PeerTable:
    """A device's peers as last read back or written, with WireGuard's own semantics.

    An allowed-ip belongs to one peer at a time: giving it to a peer takes it from the peer
    that had it, and removing a peer removes its allowed-ips. The agent keeps one of these as
    its view of the device between full read-backs, so a pass at thousands of peers costs what
    changed, not a read of the whole device; FakeBackend is one too.
    """

    def __init__(self, peers: Iterable[ActualPeer] = ()) -> None:
        self._peers: dict[str, ActualPeer] = {}
        self._owner: dict[IPNetwork, str] = {}
        for peer in peers:
            self.set(peer.public_key, peer.endpoint, peer.allowed_ips, replace_allowed_ips=True)

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, public_key: object) -> bool:
        return public_key in self._peers

    def get(self, public_key: str) -> ActualPeer | None:
        return self._peers.get(public_key)

    def peers(self) -> list[ActualPeer]:
        return list(self._peers.values())

    def remove(self, public_key: str) -> None:
        peer = self._peers.pop(public_key, None)
        for net in peer.allowed_ips if peer else ():
            if self._owner.get(net) == public_key:
                del self._owner[net]

    def set(
        self,
        public_key: str,
        endpoint: Endpoint | None,
        allowed_ips: Iterable[IPNetwork],
        *,
        replace_allowed_ips: bool,
        update_only: bool = False,
    ) -> None:
        """One peer set as a UAPI or netlink request sets it (endpoint None: unchanged)."""
        current = self._peers.get(public_key)
        if current is None:
            if update_only:
                return
            current = ActualPeer(public_key, None, ())
        given = tuple(dict.fromkeys(allowed_ips))
        kept: tuple[IPNetwork, ...] = current.allowed_ips
        if replace_allowed_ips:
            for net in kept:
                if self._owner.get(net) == public_key:
                    del self._owner[net]
            kept = ()
        for net in given:
            owner = self._owner.get(net)
            if owner is not None and owner != public_key:
                other = self._peers[owner]
                self._peers[owner] = dataclasses.replace(
                    other, allowed_ips=tuple(n for n in other.allowed_ips if n != net)
                )
            self._owner[net] = public_key
        self._peers[public_key] = ActualPeer(
            public_key, endpoint or current.endpoint, tuple(dict.fromkeys((*kept, *given)))
        )

    def apply(self, plan: Plan) -> None:
        """What applying plan does to the device (removals first, as the backends do)."""
        for key in plan.remove:
            self.remove(key)
        for update in plan.update:
            peer = update.peer
            self.set(
                peer.public_key,
                peer.endpoint if update.endpoint_changed else None,
                peer.allowed_ips if update.allowed_ips_changed else (),
                replace_allowed_ips=update.allowed_ips_changed,
                update_only=True,
            )
        for peer in plan.add:
            self.set(peer.public_key, peer.endpoint, peer.allowed_ips, replace_allowed_ips=True)


def desired_routes(peers: Iterable[DesiredPeer]) -> tuple[IPNetwork, ...]:
    """Each programmed peer's allowed-ips, routed through the device."""
    return _sorted_networks(net for peer in peers for net in peer.allowed_ips)


def plan_routes(
    desired: Iterable[DesiredPeer], actual: Iterable[IPNetwork], *, synced: bool
) -> RoutePlan:
    """Routes through the device to add and (once synced) remove.

    `actual` is the device's own routes, without the fail-closed one. Like peers, routes are
    only removed once synced, so a peer that is kept is still reachable.
    """
    want = set(desired_routes(desired))
    have = set(actual)
    return RoutePlan(
        add=_sorted_networks(want - have),
        remove=_sorted_networks(have - want) if synced else (),
    )


def mtu_for(underlay_mtu: int, ipv6_underlay: bool, *, override: int = 0) -> int:
    """The device's MTU: `override` if set, else the underlay's minus WireGuard's overhead.

    Packets are padded to a multiple of 16 only up to the MTU, so no more headroom is needed.
    """
    if override:
        return override
    overhead = OVERHEAD_IPV6 if ipv6_underlay else OVERHEAD_IPV4
    mtu = underlay_mtu - overhead
    if mtu < _MIN_INNER_MTU:
        raise ValueError(
            f"underlay MTU {underlay_mtu} leaves {mtu} bytes for pods after WireGuard's"
            f" {overhead}; set the MTU explicitly or raise the underlay's"
        )
    return mtu


@dataclasses.dataclass(frozen=True, slots=True)
class _NodeInfo:
    name: str
    internal_ips: tuple[IPAddress, ...]  # in the Node's order: the first is its primary
    pod_cidrs: tuple[IPNetwork, ...]
    bad_cidrs: tuple[str, ...]


def _node_info(node: Mapping[str, Any]) -> _NodeInfo | None:
    """What we use of a Node; tolerant of any shape, since a bad Node must not stop the loop."""
    name = _path(node, "metadata", "name")
    if not isinstance(name, str) or not name:
        return None
    ips: list[IPAddress] = []
    addresses = _path(node, "status", "addresses")
    for entry in addresses if isinstance(addresses, list) else ():
        if isinstance(entry, Mapping) and entry.get("type") == "InternalIP":
            try:
                ips.append(ipaddress.ip_address(str(entry.get("address"))))
            except ValueError:
                continue
    raw = _path(node, "spec", "podCIDRs")
    if raw is None:
        single = _path(node, "spec", "podCIDR")  # the pre-dual-stack field
        raw = [single] if single else None
    cidrs: list[IPNetwork] = []
    bad: list[str] = []
    for text in raw if isinstance(raw, list) else ():
        try:
            cidrs.append(ipaddress.ip_network(str(text), strict=True))
        except ValueError:
            bad.append(str(text))
    return _NodeInfo(name, tuple(ips), tuple(cidrs), tuple(bad))


def _node_refusals(info: _NodeInfo, overlaps: Sequence[str]) -> list[Refusal]:
    out: list[Refusal] = []
    if not info.internal_ips:
        out.append(
            Refusal(
                info.name,
                MISSING_INTERNAL_IP,
                "the Node has no valid InternalIP in status.addresses, so there is no endpoint",
            )
        )
    if info.bad_cidrs:
        out.append(
            Refusal(
                info.name,
                INVALID_POD_CIDR,
                f"the Node's spec.podCIDRs has entries that are not CIDRs: {', '.join(info.bad_cidrs)}",
            )
        )
    elif not info.pod_cidrs:
        out.append(
            Refusal(
                info.name,
                MISSING_POD_CIDRS,
                "the Node has no spec.podCIDRs (is node IPAM allocating pod CIDRs?),"
                " so there is nothing it may send",
            )
        )
    if overlaps:
        out.append(Refusal(info.name, OVERLAPPING_POD_CIDR, "; ".join(overlaps)))
    return out


def _refuse_duplicate_keys(
    keys: Mapping[str, list[str]],
    own_node: str,
    own_public_key: str | None,
    refusals: dict[str, list[Refusal]],
) -> None:
    for key, names in keys.items():
        if key == own_public_key:
            for name in names:
                refusals[name].append(
                    Refusal(
                        name,
                        DUPLICATE_PUBLIC_KEY,
                        f"publishes the public key of this node ({own_node}): {key}",
                    )
                )
        elif len(names) > 1:
            for name in names:
                others = ", ".join(n for n in names if n != name)
                refusals[name].append(
                    Refusal(
                        name,
                        DUPLICATE_PUBLIC_KEY,
                        f"public key {key} is also claimed by {others};"
                        " none of them is programmed until the keys differ",
                    )
                )


def _overlaps(infos: Iterable[_NodeInfo]) -> dict[str, list[str]]:
    """For each node whose pod CIDRs overlap another node's, one line per overlap.

    CIDRs either nest or are disjoint, so after sorting by start address (widest first) a
    CIDR overlaps exactly the CIDRs still open on the stack: O(n log n), not O(n²), which
    matters at thousands of nodes.
    """
    owned = sorted(
        ((net, info.name) for info in infos for net in info.pod_cidrs),
        key=lambda item: _network_order(item[0]),
    )
    found: dict[str, set[str]] = defaultdict(set)
    stack: list[tuple[IPNetwork, str]] = []
    for net, name in owned:
        while stack and (
            stack[-1][0].version != net.version
            or int(stack[-1][0].broadcast_address) < int(net.network_address)
        ):
            stack.pop()
        for outer, other in stack:
            if other != name:
                found[name].add(f"pod CIDR {net} overlaps {outer} of node {other}")
                found[other].add(f"pod CIDR {outer} overlaps {net} of node {name}")
        stack.append((net, name))
    return {name: sorted(lines) for name, lines in found.items()}


def _pick_address(ips: Sequence[IPAddress], family: int | None) -> IPAddress:
    # Dual stack: talk to a peer in our own primary family, which our underlay surely routes.
    return next((ip for ip in ips if ip.version == family), ips[0])


def _wgnode_name(obj: Mapping[str, Any]) -> str | None:
    name = _path(obj, "metadata", "name")
    return name if isinstance(name, str) and name else None


def _parse_spec(obj: Mapping[str, Any], name: str) -> wgnode.Spec | wgnode.ResourceError:
    # Only the spec matters for programming; a status from another podwire version must not
    # cost a peer.
    try:
        return wgnode.Spec.from_dict(obj.get("spec"), name=name)
    except wgnode.ResourceError as exc:
        return exc


def _path(obj: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


_P = TypeVar("_P", DesiredPeer, ActualPeer)


def _by_key(peers: Iterable[_P]) -> dict[str, _P]:
    out: dict[str, _P] = {}
    for peer in peers:
        if peer.public_key in out:
            raise ValueError(f"public key {peer.public_key} is listed twice")
        out[peer.public_key] = peer
    return out


def _peer_order(peer: DesiredPeer) -> tuple[str, str]:
    return (peer.node, peer.public_key)


def _network_order(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _sorted_networks(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(set(nets), key=_network_order))
