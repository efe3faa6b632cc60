"""One model of a WireGuard device and its peers, whoever holds it.

The kernel's WireGuard (read over generic netlink), a userspace engine (read over the UAPI
socket), the agent's own record of its device between read-backs, and the unit tests' fake all
speak these types, so a peer means the same thing on every path: `Peer` is what a device reports
of a peer, `Device` what it reports of itself (never its private key), and `PeerChange` one peer
in a set request, with the meaning `wg set` and the UAPI give it.

`PeerTable` is that meaning written down once: an allowed-ip belongs to one peer at a time, so
giving it to a peer takes it from the peer that had it, and removing a peer removes its
allowed-ips. The agent's record of the device and the fake device are both PeerTables.

Pure: no I/O, no clock, no kubernetes, no netlink (an import-linter contract says so).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

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
class Peer:
    """A peer as a device reports it. Keys are base64, as `wg show` prints them.

    allowed_ips are in the device's order; compare them as sets.
    """

    public_key: str
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    last_handshake: float | None = None  # unix time; None when there has been none
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0  # seconds; 0 is off
    has_preshared_key: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Device:
    """A device as it reports itself, without the private key itself."""

    has_private_key: bool
    public_key: str | None  # derived from the private key; None without one
    listen_port: int
    fwmark: int
    peers: tuple[Peer, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PeerChange:
    """One peer in a set request: added or changed, or with `remove` taken away.

    `allowed_ips` are added to the peer's; with `replace_allowed_ips` they replace them (an
    empty tuple then clears them). With `update_only` an unknown peer is not created. An
    endpoint or keepalive of None leaves the peer's as it is.

    With `renamed_from` (a key rotation seen on a peer's WireguardNode) the peer that had that
    key takes `public_key` first, and the rest of the change applies to it. podwire-engine
    renames in place: its sessions, counters and allowed-ips stay, so no packet waits for a
    handshake, and it starts one with the new key at once. A kernel device has no rename: the
    old peer is removed and the new one made in the same request (the change then carries the
    whole peer). An unknown `renamed_from` makes the change a plain one on `public_key`.
    """

    public_key: str  # base64
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    replace_allowed_ips: bool = False
    update_only: bool = False
    remove: bool = False
    persistent_keepalive: int | None = None
    renamed_from: str | None = None  # base64: the peer's key before a rotation


def without_renames(changes: Iterable[PeerChange]) -> list[PeerChange]:
    """The same changes for a device that cannot rename a peer (the kernel, wireguard-go):
    the new peer is made first, taking the allowed-ips so no packet finds no peer, then the
    old one removed. Its sessions go with it; a greeting starts the handshake at once."""
    out: list[PeerChange] = []
    for change in changes:
        old = change.renamed_from
        if old is None or old == change.public_key:
            out.append(change)
            continue
        out.append(dataclasses.replace(change, renamed_from=None))
        out.append(PeerChange(old, remove=True))
    return out


def greeting(public_keys: Sequence[str]) -> tuple[list[PeerChange], list[PeerChange]]:
    """Two requests that make the device send each peer a keepalive now, and no more later.

    Turning a peer's persistent keepalive on sends one at once (kernel, wireguard-go and
    podwire-engine alike); with no session yet, that starts a handshake. A device that was just
    created uses this so the other nodes drop their session with its dead predecessor at once,
    instead of after WireGuard's 15 s without an answer.
    """
    return (
        [PeerChange(k, persistent_keepalive=1, update_only=True) for k in public_keys],
        [PeerChange(k, persistent_keepalive=0, update_only=True) for k in public_keys],
    )


class PeerTable:
    """A device's peers with WireGuard's own semantics, changed as a set request changes them.

    The agent keeps one as its view of the device between full read-backs, so a pass at
    thousands of peers costs what changed, not a read of the whole device; the test double of
    a device is one too.
    """

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self._peers: dict[str, Peer] = {}
        self._owner: dict[IPNetwork, str] = {}
        for peer in peers:
            self._peers[peer.public_key] = dataclasses.replace(peer, allowed_ips=())
            self._give(peer.public_key, peer.allowed_ips, ())

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, public_key: object) -> bool:
        return public_key in self._peers

    def get(self, public_key: str) -> Peer | None:
        return self._peers.get(public_key)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def apply(self, changes: Iterable[PeerChange]) -> None:
        """The changes in order, as one set request applies them."""
        for change in changes:
            self.apply_change(change)

    def apply_change(self, change: PeerChange) -> None:
        if change.renamed_from is not None and change.renamed_from != change.public_key:
            self._rename(change.renamed_from, change.public_key)
        current = self._peers.get(change.public_key)
        if change.remove:
            if current is not None:
                self._take(change.public_key, current.allowed_ips)
                del self._peers[change.public_key]
            return
        if current is None:
            if change.update_only:
                return
            current = Peer(change.public_key)
        kept = current.allowed_ips
        if change.replace_allowed_ips:
            self._take(change.public_key, kept)
            kept = ()
        keepalive = change.persistent_keepalive
        self._peers[change.public_key] = dataclasses.replace(
            current,
            endpoint=change.endpoint or current.endpoint,
            allowed_ips=kept,
            persistent_keepalive=current.persistent_keepalive if keepalive is None else keepalive,
        )
        self._give(change.public_key, change.allowed_ips, kept)

    def _rename(self, old: str, new: str) -> None:
        if old not in self._peers:
            return
        if new in self._peers:
            raise ValueError(f"cannot rename peer {old} to {new}: a peer with that key exists")
        peer = self._peers.pop(old)
        self._peers[new] = dataclasses.replace(peer, public_key=new)
        for net in peer.allowed_ips:
            self._owner[net] = new

    def _give(self, key: str, nets: Iterable[IPNetwork], kept: tuple[IPNetwork, ...]) -> None:
        given = tuple(dict.fromkeys(nets))
        for net in given:
            owner = self._owner.get(net)
            if owner is not None and owner != key:
                other = self._peers[owner]
                self._peers[owner] = dataclasses.replace(
                    other, allowed_ips=tuple(n for n in other.allowed_ips if n != net)
                )
            self._owner[net] = key
        peer = self._peers[key]
        self._peers[key] = dataclasses.replace(
            peer, allowed_ips=tuple(dict.fromkeys((*kept, *given)))
        )

    def _take(self, key: str, nets: Iterable[IPNetwork]) -> None:
        for net in nets:
            if self._owner.get(net) == key:
                del self._owner[net]
