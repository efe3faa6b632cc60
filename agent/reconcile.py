"""What the WireGuard device should hold, and the smallest change that gets it there.

The agent is level-triggered: whatever event woke it, it recomputes the desired peers from
the Nodes and WireguardNodes it has cached, reads the device back, and applies the difference.
All of that thinking lives here, pure (no I/O, no clock, no kubernetes import), so it is tested
on tables of plain dicts and the backends that touch the kernel stay thin.

Trust: a peer's allowed-ips (what it may send us, and what we route to it) come from the Node
object, which the control plane writes, never from the WireguardNode a node writes about itself.
A public key or pod CIDR that two nodes claim cannot be given to both without one capturing
the other's traffic, so every node involved is refused and reported, and the rest go on. So is
a Node whose pod CIDR lies outside the cluster's pod CIDRs (or in a family they do not cover):
its allowed-ips and route would draw traffic that is not pod traffic, or that the fail-closed
backstop does not guard, into or past the tunnel; and one that covers a node's address, which
would route the underlay itself into the tunnel.

Removal is the dangerous direction: a peer missing from a half-filled cache is not a peer that
left. Nothing is removed unless the caller says both watches have listed (`synced=True`).
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

from podwire.agent import wgdevice
from podwire.api import wgnode

# Refusal reasons: CamelCase, so they can be an Event's and a condition's reason as they are.
DUPLICATE_PUBLIC_KEY: Final = "DuplicatePublicKey"
OVERLAPPING_POD_CIDR: Final = "OverlappingPodCIDR"
MISSING_INTERNAL_IP: Final = "MissingInternalIP"
MISSING_POD_CIDRS: Final = "MissingPodCIDRs"
INVALID_POD_CIDR: Final = "InvalidPodCIDR"
INVALID_PUBLIC_KEY: Final = "InvalidPublicKey"
INVALID_WIREGUARD_NODE: Final = "InvalidWireguardNode"
POD_CIDR_OUTSIDE_CLUSTER: Final = "PodCIDROutsideCluster"
POD_CIDR_COVERS_NODE_ADDRESS: Final = "PodCIDRCoversNodeAddress"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerLane:
    """One of a peer's lanes beyond the first, as its WireguardNode publishes it."""

    public_key: str
    endpoint: wgdevice.Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class DesiredPeer:
    """A peer the device should hold; allowed_ips sorted, taken from the peer's Node.

    `lanes` are the peer's lanes 1..N-1 (its lane 0 is `public_key` and `endpoint`)."""

    node: str
    public_key: str
    endpoint: wgdevice.Endpoint
    allowed_ips: tuple[wgdevice.IPNetwork, ...]
    lanes: tuple[PeerLane, ...] = ()


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
class PeerRename:
    """A node that rotated its key: the device's peer under `old_key` becomes `peer`."""

    old_key: str
    peer: DesiredPeer


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    add: tuple[DesiredPeer, ...] = ()
    update: tuple[PeerUpdate, ...] = ()
    remove: tuple[str, ...] = ()  # public keys
    rename: tuple[PeerRename, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.update or self.remove or self.rename)


@dataclasses.dataclass(frozen=True, slots=True)
class PathPlan:
    """Routes over several lanes: each added (or replaced) destination with the lanes its
    nexthops go through (one lane: a plain route), and the destinations to remove."""

    add: tuple[tuple[wgdevice.IPNetwork, tuple[int, ...]], ...] = ()
    remove: tuple[wgdevice.IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


@dataclasses.dataclass(frozen=True, slots=True)
class RoutePlan:
    """Routes through the device to add and remove, by destination."""

    add: tuple[wgdevice.IPNetwork, ...] = ()
    remove: tuple[wgdevice.IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def server_addresses(url: str) -> tuple[wgdevice.IPAddress, ...]:
    """The address in an apiserver URL (`https://10.0.0.1:6443`, `https://[fd00::1]`), when it
    is one; a host name gives none (resolving it is not this pure module's business)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        return ()


def desired_peers(
    nodes: Iterable[Mapping[str, Any]],
    wgnodes: Iterable[Mapping[str, Any]],
    own_node: str,
    *,
    own_public_key: str | None = None,
    own_lane_keys: Iterable[str] = (),
    cluster_pod_cidrs: Sequence[wgdevice.IPNetwork] = (),
    protected: Iterable[wgdevice.IPAddress] = (),
) -> Desired:
    """The peers to program from the cached Nodes and WireguardNodes (raw JSON dicts).

    `own_public_key` is the key this agent uses now; without it, the one its WireguardNode
    publishes. A node with no WireguardNode yet is simply not a peer yet; one with a
    WireguardNode but something wrong or contested is refused (possibly for several reasons).
    A peer's pod CIDRs must lie inside `cluster_pod_cidrs` (empty: the setting is off, nothing
    to check against) and cover no node's address nor any of `protected` (the apiserver's, when
    the caller knows it). Every lane's key counts as a claim: a key that two lanes (of any
    nodes) publish, or that is one of ours (`own_lane_keys`, lanes 1..N-1), is refused.
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
            for key in (spec.public_key, *(lane.public_key for lane in spec.lanes)):
                claims[key].append(name)
        else:
            reason = (
                INVALID_PUBLIC_KEY if spec.field == "spec.publicKey" else INVALID_WIREGUARD_NODE
            )
            refusals[name].append(Refusal(name, reason, str(spec)))
    _refuse_duplicate_keys(claims, own_node, {own_public_key, *own_lane_keys}, refusals)
    overlaps = _overlaps(infos.values())
    guarded = _node_addresses(infos.values(), protected)

    peers: list[DesiredPeer] = []
    own_family = own.internal_ips[0].version if own and own.internal_ips else None
    for name in candidates:
        info = infos[name]
        refusals[name].extend(_node_refusals(info, overlaps.get(name, ())))
        refusals[name].extend(_range_refusals(info, cluster_pod_cidrs, guarded))
        spec = specs[name]
        if refusals[name] or not isinstance(spec, wgnode.Spec):
            continue
        address = _pick_address(info.internal_ips, own_family)
        peers.append(
            DesiredPeer(
                node=name,
                public_key=spec.public_key,
                endpoint=wgdevice.make_endpoint(address, spec.listen_port),
                allowed_ips=_sorted_networks(info.pod_cidrs),
                lanes=tuple(
                    PeerLane(lane.public_key, wgdevice.make_endpoint(address, lane.listen_port))
                    for lane in spec.lanes
                ),
            )
        )
    flat = sorted(
        (r for rs in refusals.values() for r in rs), key=lambda r: (r.node, r.reason, r.message)
    )
    return Desired(peers=tuple(peers), refusals=tuple(flat))


def plan_peers(
    desired: Iterable[DesiredPeer], actual: Iterable[wgdevice.Peer], *, synced: bool
) -> Plan:
    """The smallest change from the device's `actual` peers to `desired`, keyed by public key.

    Pass `synced=False` until both watches have listed, and while the apiserver cannot be
    reached: the device then only gains and changes peers, it never loses one.

    A node that rotated its key shows up as a wanted key the device lacks whose pod CIDRs a
    peer no longer wanted holds: that peer is renamed (`PeerRename`), not removed and added,
    so on podwire-engine its sessions carry on while it handshakes with the new key. Only once
    synced: before, the new key is added beside the old, which is kept.
    """
    want = _by_key(desired)
    have = _by_key(actual)
    unwanted = (
        {
            frozenset(p.allowed_ips): key
            for key, p in have.items()
            if key not in want and p.allowed_ips
        }
        if synced
        else {}
    )
    add: list[DesiredPeer] = []
    update: list[PeerUpdate] = []
    rename: list[PeerRename] = []
    for key, peer in want.items():
        current = have.get(key)
        if current is None:
            old = unwanted.pop(frozenset(peer.allowed_ips), None)
            if old is not None:
                rename.append(PeerRename(old, peer))
            else:
                add.append(peer)
            continue
        endpoint_changed = current.endpoint != peer.endpoint
        allowed_changed = frozenset(current.allowed_ips) != frozenset(peer.allowed_ips)
        if endpoint_changed or allowed_changed:
            update.append(PeerUpdate(peer, endpoint_changed, allowed_changed))
    renamed = {r.old_key for r in rename}
    remove = sorted(set(have) - set(want) - renamed) if synced else []
    return Plan(
        add=tuple(sorted(add, key=_peer_order)),
        update=tuple(sorted(update, key=lambda u: _peer_order(u.peer))),
        remove=tuple(remove),
        rename=tuple(sorted(rename, key=lambda r: _peer_order(r.peer))),
    )


def plan_changes(plan: Plan) -> list[wgdevice.PeerChange]:
    """What a Plan means for a device, as peer changes in the order to apply them.

    Removals first, so an allowed-ip that moves from a leaving peer lands last; a renamed peer
    is sent in full (a kernel device makes it anew); an update sends only what changed; an
    added peer gets its allowed-ips in full.
    """
    changes = [wgdevice.PeerChange(key, remove=True) for key in plan.remove]
    changes.extend(
        wgdevice.PeerChange(
            r.peer.public_key,
            endpoint=r.peer.endpoint,
            allowed_ips=r.peer.allowed_ips,
            replace_allowed_ips=True,
            renamed_from=r.old_key,
        )
        for r in plan.rename
    )
    for update in plan.update:
        peer = update.peer
        changes.append(
            wgdevice.PeerChange(
                peer.public_key,
                endpoint=peer.endpoint if update.endpoint_changed else None,
                allowed_ips=peer.allowed_ips if update.allowed_ips_changed else (),
                replace_allowed_ips=update.allowed_ips_changed,
                update_only=True,
            )
        )
    changes.extend(
        wgdevice.PeerChange(
            peer.public_key,
            endpoint=peer.endpoint,
            allowed_ips=peer.allowed_ips,
            replace_allowed_ips=True,
        )
        for peer in plan.add
    )
    return changes


def desired_routes(peers: Iterable[DesiredPeer]) -> tuple[wgdevice.IPNetwork, ...]:
    """Each programmed peer's allowed-ips, routed through the device."""
    return _sorted_networks(net for peer in peers for net in peer.allowed_ips)


def plan_routes(
    desired: Iterable[DesiredPeer], actual: Iterable[wgdevice.IPNetwork], *, synced: bool
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


def lane_peers(peers: Iterable[DesiredPeer], lane: int) -> tuple[DesiredPeer, ...]:
    """The peers lane `lane` of this node holds: lane `lane` of every peer that has it.

    Lane 0 holds every peer as it is; lane i > 0 holds each peer with at least i+1 lanes,
    under that lane's key and port (a peer with fewer lanes is reached over the lanes it has).
    """
    if lane == 0:
        return tuple(peers)
    return tuple(
        dataclasses.replace(
            peer,
            public_key=peer.lanes[lane - 1].public_key,
            endpoint=peer.lanes[lane - 1].endpoint,
            lanes=(),
        )
        for peer in peers
        if len(peer.lanes) >= lane
    )


def shared_lanes(peer: DesiredPeer, own_lanes: int) -> tuple[int, ...]:
    """The lanes this node and `peer` both have: the ones its traffic may travel on."""
    return tuple(range(min(own_lanes, 1 + len(peer.lanes))))


def desired_paths(
    peers: Iterable[DesiredPeer], own_lanes: int
) -> dict[wgdevice.IPNetwork, tuple[int, ...]]:
    """Each programmed peer's allowed-ips, with the lanes its route's nexthops go through."""
    out: dict[wgdevice.IPNetwork, tuple[int, ...]] = {}
    for peer in peers:
        lanes = shared_lanes(peer, own_lanes)
        for net in peer.allowed_ips:
            out[net] = lanes
    return out


def plan_paths(
    desired: Mapping[wgdevice.IPNetwork, tuple[int, ...]],
    actual: Mapping[wgdevice.IPNetwork, tuple[int, ...]],
    *,
    synced: bool,
) -> PathPlan:
    """Routes to set (new, or over other lanes than they have) and (once synced) remove.

    `actual` is podwire's routes through any lane, with the lanes of their nexthops."""
    add = [(net, lanes) for net, lanes in desired.items() if actual.get(net) != lanes]
    remove = _sorted_networks(set(actual) - set(desired)) if synced else ()
    return PathPlan(add=tuple(sorted(add, key=lambda item: _network_order(item[0]))), remove=remove)


@dataclasses.dataclass(frozen=True, slots=True)
class _NodeInfo:
    name: str
    internal_ips: tuple[wgdevice.IPAddress, ...]  # in the Node's order: the first is its primary
    pod_cidrs: tuple[wgdevice.IPNetwork, ...]
    bad_cidrs: tuple[str, ...]


def _node_info(node: Mapping[str, Any]) -> _NodeInfo | None:
    """What we use of a Node; tolerant of any shape, since a bad Node must not stop the loop."""
    name = _path(node, "metadata", "name")
    if not isinstance(name, str) or not name:
        return None
    raw = _path(node, "spec", "podCIDRs")
    if raw is None:
        single = _path(node, "spec", "podCIDR")  # the pre-dual-stack field
        raw = [single] if single else None
    cidrs: list[wgdevice.IPNetwork] = []
    bad: list[str] = []
    for text in raw if isinstance(raw, list) else ():
        try:
            cidrs.append(ipaddress.ip_network(str(text), strict=True))
        except ValueError:
            bad.append(str(text))
    return _NodeInfo(name, internal_ips(node), tuple(cidrs), tuple(bad))


def pod_cidrs(node: Mapping[str, Any]) -> tuple[wgdevice.IPNetwork, ...]:
    """A Node's valid pod CIDRs (the node's own, for its local pods)."""
    info = _node_info(node)
    return info.pod_cidrs if info else ()


def internal_ips(node: Mapping[str, Any]) -> tuple[wgdevice.IPAddress, ...]:
    """A Node's valid InternalIPs in its own order: the first is its primary (the underlay)."""
    ips: list[wgdevice.IPAddress] = []
    addresses = _path(node, "status", "addresses")
    for entry in addresses if isinstance(addresses, list) else ():
        if isinstance(entry, Mapping) and entry.get("type") == "InternalIP":
            try:
                ips.append(ipaddress.ip_address(str(entry.get("address"))))
            except ValueError:
                continue
    return tuple(ips)


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


def _range_refusals(
    info: _NodeInfo,
    cluster: Sequence[wgdevice.IPNetwork],
    guarded: _Addresses,
) -> list[Refusal]:
    out: list[Refusal] = []
    outside = [_outside_why(net, cluster) for net in info.pod_cidrs] if cluster else []
    if any(outside):
        out.append(
            Refusal(
                info.name,
                POD_CIDR_OUTSIDE_CLUSTER,
                "; ".join(why for why in outside if why)
                + ": its pods' traffic would not be pod traffic podwire guards",
            )
        )
    covered = [
        f"pod CIDR {net} covers {ip}, an address of {owner}"
        for net in info.pod_cidrs
        for ip, owner in guarded.within(net)
    ]
    if covered:
        out.append(
            Refusal(
                info.name,
                POD_CIDR_COVERS_NODE_ADDRESS,
                "; ".join(covered) + ": routing it into the tunnel would cut the node off",
            )
        )
    return out


def _outside_why(net: wgdevice.IPNetwork, cluster: Sequence[wgdevice.IPNetwork]) -> str:
    """Why `net` may not be a peer's pod CIDR, or "" when it lies inside the cluster's."""
    same = [c for c in cluster if c.version == net.version]
    if not same:
        return (
            f"pod CIDR {net} is IPv{net.version}, and clusterPodCIDRs"
            f" ({', '.join(map(str, cluster))}) covers no IPv{net.version} range"
        )
    if any(net.subnet_of(c) for c in same):  # type: ignore[arg-type]  # same family
        return ""
    return f"pod CIDR {net} lies outside clusterPodCIDRs ({', '.join(map(str, cluster))})"


class _Addresses:
    """Addresses no pod CIDR may cover, with whose they are, sorted to find those in a CIDR
    by bisection: every node's check against every node's addresses would be O(n²)."""

    def __init__(self, owned: Mapping[wgdevice.IPAddress, str]) -> None:
        items = sorted(owned.items(), key=lambda item: (item[0].version, int(item[0])))
        self._keys = [(ip.version, int(ip)) for ip, _ in items]
        self._items = items

    def within(self, net: wgdevice.IPNetwork) -> list[tuple[wgdevice.IPAddress, str]]:
        low = bisect.bisect_left(self._keys, (net.version, int(net.network_address)))
        high = bisect.bisect_right(self._keys, (net.version, int(net.broadcast_address)))
        return self._items[low:high]


def _node_addresses(
    infos: Iterable[_NodeInfo], protected: Iterable[wgdevice.IPAddress]
) -> _Addresses:
    owned: dict[wgdevice.IPAddress, str] = {ip: "the apiserver" for ip in protected}
    for info in infos:
        for ip in info.internal_ips:
            owned.setdefault(ip, f"node {info.name}")
    return _Addresses(owned)


def _refuse_duplicate_keys(
    keys: Mapping[str, list[str]],
    own_node: str,
    own_keys: set[str | None],
    refusals: dict[str, list[Refusal]],
) -> None:
    for key, names in keys.items():
        if key in own_keys:
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
    stack: list[tuple[wgdevice.IPNetwork, str]] = []
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


def _pick_address(ips: Sequence[wgdevice.IPAddress], family: int | None) -> wgdevice.IPAddress:
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


_P = TypeVar("_P", DesiredPeer, wgdevice.Peer)


def _by_key(peers: Iterable[_P]) -> dict[str, _P]:
    out: dict[str, _P] = {}
    for peer in peers:
        if peer.public_key in out:
            raise ValueError(f"public key {peer.public_key} is listed twice")
        out[peer.public_key] = peer
    return out


def _peer_order(peer: DesiredPeer) -> tuple[str, str]:
    return (peer.node, peer.public_key)


def _network_order(net: wgdevice.IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _sorted_networks(nets: Iterable[wgdevice.IPNetwork]) -> tuple[wgdevice.IPNetwork, ...]:
    return tuple(sorted(set(nets), key=_network_order))
