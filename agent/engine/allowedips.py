"""Allowed-ips: the cryptokey routing table (paper section 2), longest-prefix match.

One table maps destination addresses to the peer that sends for them, and the same table
checks that a decrypted packet's source belongs to the peer it came from. Lookups happen per
packet, so instead of a trie walked bit by bit in Python, each address family keeps one dict
per prefix length in use, probed from the longest length down: a handful of dict lookups.
A prefix belongs to one peer only: inserting it for another peer takes it away from the first.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

PeerT = TypeVar("PeerT")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_prefix(prefix: str | Network) -> Network:
    """A network with host bits cleared, as wg does with "10.0.0.1/24"."""
    if isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return prefix
    return ipaddress.ip_network(prefix, strict=False)


class _Family(Generic[PeerT]):
    __slots__ = ("bits", "levels", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, PeerT]] = {}
        # (shift, table) for each prefix length in use, longest first: what lookup walks
        self.levels: list[tuple[int, dict[int, PeerT]]] = []

    def rebuild(self) -> None:
        self.levels = [
            (self.bits - length, self.tables[length])
            for length in sorted(self.tables, reverse=True)
        ]

    def lookup(self, value: int) -> PeerT | None:
        for shift, table in self.levels:
            peer = table.get(value >> shift)
            if peer is not None:
                return peer
        return None


class AllowedIPs(Generic[PeerT]):
    def __init__(self) -> None:
        self._v4: _Family[PeerT] = _Family(32)
        self._v6: _Family[PeerT] = _Family(128)
        self._by_peer: dict[PeerT, dict[Network, None]] = {}

    def _family(self, network: Network) -> _Family[PeerT]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, prefix: str | Network, peer: PeerT) -> None:
        network = parse_prefix(prefix)
        self.remove(network)
        family = self._family(network)
        table = family.tables.get(network.prefixlen)
        if table is None:
            table = family.tables[network.prefixlen] = {}
            family.rebuild()
        table[int(network.network_address) >> (family.bits - network.prefixlen)] = peer
        self._by_peer.setdefault(peer, {})[network] = None

    def remove(self, prefix: str | Network, peer: PeerT | None = None) -> PeerT | None:
        """Remove a prefix (only if `peer` holds it, when given, as `wg`'s `allowed_ip=-`
        does); returns the peer that held it, if it was removed."""
        network = parse_prefix(prefix)
        family = self._family(network)
        table = family.tables.get(network.prefixlen)
        if table is None:
            return None
        key = int(network.network_address) >> (family.bits - network.prefixlen)
        holder = table.get(key)
        if holder is None or (peer is not None and holder is not peer):
            return None
        del table[key]
        peer = holder
        if not table:
            del family.tables[network.prefixlen]
            family.rebuild()
        entries = self._by_peer[peer]
        del entries[network]
        if not entries:
            del self._by_peer[peer]
        return peer

    def remove_by_peer(self, peer: PeerT) -> None:
        for network in list(self._by_peer.get(peer, ())):
            self.remove(network)

    def entries_for_peer(self, peer: PeerT) -> list[Network]:
        """The peer's prefixes in the order they were inserted (for UAPI get)."""
        return list(self._by_peer.get(peer, ()))

    # Lookups take the address as an integer, as the datapath reads it from a packet's header.

    def lookup_v4(self, value: int) -> PeerT | None:
        """The peer whose longest IPv4 prefix contains the address."""
        return self._v4.lookup(value)

    def lookup_v6(self, value: int) -> PeerT | None:
        """The peer whose longest IPv6 prefix contains the address."""
        return self._v6.lookup(value)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_peer.values())
