"""Allowed-ips against a deliberately naive implementation on random input."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from podwire.agent.engine import allowedips

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _lookup(
    table: allowedips.AllowedIPs[str], address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> str | None:
    """As the datapath looks up: the address as an integer, by family."""
    if address.version == 4:
        return table.lookup_v4(int(address))
    return table.lookup_v6(int(address))


class Naive:
    """A list of (network, peer); lookup scans it all for the longest containing prefix."""

    def __init__(self) -> None:
        self.entries: dict[Network, str] = {}

    def insert(self, network: Network, peer: str) -> None:
        self.entries[network] = peer

    def remove(self, network: Network) -> None:
        self.entries.pop(network, None)

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        best: tuple[int, str] | None = None
        for network, peer in self.entries.items():
            inside = network.version == address.version and address in network
            if inside and (best is None or network.prefixlen > best[0]):
                best = (network.prefixlen, peer)
        return best[1] if best else None


# Addresses concentrated in a few regions so that prefixes nest and collide.
v4_addresses = st.builds(
    lambda hi, lo: ipaddress.IPv4Address((hi << 24) | lo),
    st.sampled_from([0, 10, 192, 255]),
    st.one_of(st.integers(0, 255), st.integers(0, 2**24 - 1)),
)
v6_addresses = st.builds(
    lambda hi, lo: ipaddress.IPv6Address((hi << 96) | lo),
    st.sampled_from([0, 0xFD000000, 0x20010DB8, 2**32 - 1]),
    st.one_of(st.integers(0, 255), st.integers(0, 2**96 - 1)),
)
v4_networks = st.builds(
    lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False), v4_addresses, st.integers(0, 32)
)
v6_networks = st.builds(
    lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False), v6_addresses, st.integers(0, 128)
)
peers = st.sampled_from(["p1", "p2", "p3"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.one_of(v4_networks, v6_networks), peers),
        st.tuples(st.just("remove"), st.one_of(v4_networks, v6_networks), st.just("")),
        st.tuples(st.just("remove_by_peer"), st.just(None), peers),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(st.one_of(v4_addresses, v6_addresses), max_size=40))
def test_lookup_matches_the_naive_scan(
    ops: list[tuple[str, Network | None, str]],
    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    table: allowedips.AllowedIPs[str] = allowedips.AllowedIPs()
    naive = Naive()
    for op, network, peer in ops:
        if op == "insert":
            assert network is not None
            table.insert(network, peer)
            naive.insert(network, peer)
        elif op == "remove":
            assert network is not None
            table.remove(network)
            naive.remove(network)
        else:
            table.remove_by_peer(peer)
            for net in [n for n, p in naive.entries.items() if p == peer]:
                naive.remove(net)
    # probe the inserted networks' own first and last addresses too
    probes = probes + [n.network_address for n in naive.entries]
    probes += [n.broadcast_address for n in naive.entries]
    for address in probes:
        assert _lookup(table, address) == naive.lookup(address), address
    for peer in ("p1", "p2", "p3"):
        assert set(table.entries_for_peer(peer)) == {
            n for n, p in naive.entries.items() if p == peer
        }
    assert len(table) == len(naive.entries)


def test_a_prefix_given_to_another_peer_is_taken_from_the_first() -> None:
    table: allowedips.AllowedIPs[str] = allowedips.AllowedIPs()
    table.insert("10.0.0.0/24", "a")
    table.insert("10.0.0.0/16", "a")
    table.insert("10.0.0.0/24", "b")
    assert _lookup(table, ipaddress.ip_address("10.0.0.9")) == "b"
    assert _lookup(table, ipaddress.ip_address("10.0.1.9")) == "a"
    assert table.entries_for_peer("a") == [ipaddress.ip_network("10.0.0.0/16")]
    assert table.entries_for_peer("b") == [ipaddress.ip_network("10.0.0.0/24")]


def test_host_bits_are_cleared_and_entries_keep_their_order() -> None:
    table: allowedips.AllowedIPs[str] = allowedips.AllowedIPs()
    for prefix in ["fd00::1/64", "10.1.2.3/8", "192.168.0.1/32"]:
        table.insert(prefix, "a")
    assert [str(n) for n in table.entries_for_peer("a")] == [
        "fd00::/64",
        "10.0.0.0/8",
        "192.168.0.1/32",
    ]
    table.remove_by_peer("a")
    assert _lookup(table, ipaddress.ip_address("10.9.9.9")) is None
    assert table.entries_for_peer("a") == []


def test_default_routes_hold_each_family_apart() -> None:
    table: allowedips.AllowedIPs[str] = allowedips.AllowedIPs()
    table.insert("0.0.0.0/0", "v4")
    assert table.lookup_v6(0) is None
    table.insert("::/0", "v6")
    assert table.lookup_v4(0) == "v4"
    assert table.lookup_v4(2**32 - 1) == "v4"
    assert table.lookup_v6(2**128 - 1) == "v6"


def test_removing_a_prefix_for_one_peer_leaves_another_peers_alone() -> None:
    table: allowedips.AllowedIPs[str] = allowedips.AllowedIPs()
    table.insert("10.0.0.0/24", "a")
    assert table.remove("10.0.0.0/24", "b") is None
    assert _lookup(table, ipaddress.ip_address("10.0.0.1")) == "a"
    assert table.remove("10.0.0.0/24", "a") == "a"
    assert _lookup(table, ipaddress.ip_address("10.0.0.1")) is None
