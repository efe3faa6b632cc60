"""Duplicate keys and overlapping pod CIDRs across WireguardNodes, checked against a naive
all-pairs model on random input."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from podwire.operator import conflicts


def wg(name: str, key: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"publicKey": key, "listenPort": 51871}}


def node(name: str, *cidrs: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"podCIDRs": list(cidrs)}}


def test_a_shared_key_flags_both_nodes_naming_each_other() -> None:
    found = conflicts.find([wg("a", "K1"), wg("b", "K1"), wg("c", "K2")], [])
    assert set(found) == {"a", "b"}
    assert found["a"] == conflicts.Conflict(
        "DuplicateKey", ("b",), "public key also published by b"
    )
    assert found["b"].others == ("a",)


def test_overlapping_pod_cidrs_come_from_the_nodes() -> None:
    wgs = [wg("a", "K1"), wg("b", "K2"), wg("c", "K3")]
    nodes = [node("a", "10.0.0.0/16"), node("b", "10.0.5.0/24"), node("c", "10.1.0.0/24")]
    found = conflicts.find(wgs, nodes)
    assert set(found) == {"a", "b"}
    assert found["a"].reason == "OverlappingPodCIDR"
    assert found["a"].message == "pod CIDR 10.0.0.0/16 overlaps 10.0.5.0/24 of b"
    assert found["b"].message == "pod CIDR 10.0.5.0/24 overlaps 10.0.0.0/16 of a"


def test_a_key_clash_is_the_reason_when_both_apply_and_the_message_says_both() -> None:
    found = conflicts.find(
        [wg("a", "K"), wg("b", "K")], [node("a", "10.0.0.0/24"), node("b", "10.0.0.0/24")]
    )
    assert found["a"].reason == "DuplicateKey"
    assert (
        found["a"].message
        == "public key also published by b; pod CIDR 10.0.0.0/24 overlaps 10.0.0.0/24 of b"
    )


def test_nodes_without_a_wireguardnode_and_families_apart_do_not_clash() -> None:
    nodes = [
        node("a", "10.0.0.0/24", "fd00::/64"),
        node("b", "fd00::/64"),
        node("c", "10.0.0.0/24"),
    ]
    found = conflicts.find([wg("a", "K1"), wg("b", "K2")], nodes)
    assert set(found) == {"a", "b"}  # c has no WireguardNode: the agents do not program it either
    assert "fd00::/64" in found["a"].message and "10.0.0.0" not in found["a"].message


def test_malformed_objects_are_no_conflict() -> None:
    found = conflicts.find(
        [{"metadata": {}}, wg("a", ""), {"metadata": {"name": "b"}}], [node("a", "bogus")]
    )
    assert found == {}


networks = st.builds(
    lambda a, b, prefix: ipaddress.ip_network(f"10.{a}.{b}.0/{prefix}", strict=False),
    st.integers(0, 3), st.integers(0, 255), st.integers(14, 26),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.lists(networks, max_size=3), max_size=8))
def test_the_sweep_finds_exactly_the_pairs_a_naive_check_finds(cidrs: dict[str, list[Any]]) -> None:
    naive: dict[str, set[tuple[str, str, str]]] = {}
    for (n1, nets1), (n2, nets2) in itertools.permutations(cidrs.items(), 2):
        for x, y in itertools.product(nets1, nets2):
            if x.overlaps(y):
                naive.setdefault(n1, set()).add((str(x), str(y), n2))
    got = conflicts.overlapping(cidrs)
    assert {k: set(v) for k, v in got.items()} == naive
