"""GRO, BIG TCP and UDP GRO forwarding on a kernel that has them (Linux >= 6.13 for BIG TCP on
a WireGuard device): applied, in force as the kernel reports it, reported as the agent reports
it, and each one left off when the config turns it off.

The checks run in the VM through tests/kernel/guest/features.py, which reads the kernel back
with `ip -d link` and `ethtool -k`, not with podwire's own netlink code.
"""

from __future__ import annotations

from typing import Any

import pytest

BIG = 196608  # BIG TCP's 192 KiB, as the agent sets it
LEGACY = 65536  # the kernel's default
BIG_TCP = ("gso_max_size", "gso_ipv4_max_size", "gro_ipv4_max_size")


@pytest.fixture(scope="module")
def facts(vm: Any) -> dict[str, Any]:
    got: dict[str, Any] = vm.python("features.py", timeout=400)
    print(f"\nfeatures: scenario {got['_seconds']}s; {got['ip_version']}; 16 MiB over TCP in "
          f"{got['traffic']['seconds']}s ({got['traffic']['mbit_per_s']} Mbit/s)")  # fmt: skip
    for case in ("all_on", "gro_off", "big_tcp_off", "udp_gro_forwarding_off", "restarted_all_off"):
        print(f"  {case}: reported {got[case]['reported']}, sizes {got[case]['sizes']}, "
              f"udp-gro-forwarding {got[case]['udp_gro_forwarding']}")  # fmt: skip
    return got


def test_every_feature_is_in_force_and_reported(facts: dict[str, Any]) -> None:
    case = facts["all_on"]
    assert case["datapath"] == "kernel"
    assert case["reported"] == ["gro", "big_tcp", "udp_gro_forwarding", "threaded_napi"]
    sizes = case["sizes"]
    assert sizes["tso_max_size"] > LEGACY, "this kernel's WireGuard takes segments above 64 KiB"
    assert sizes["gro_max_size"] == BIG
    assert {name: sizes[name] for name in BIG_TCP} == dict.fromkeys(BIG_TCP, BIG)
    assert (case["underlay_before"], case["udp_gro_forwarding"]) == ("off", "on")


def test_gro_turned_off_stays_off(facts: dict[str, Any]) -> None:
    case = facts["gro_off"]
    assert case["reported"] == ["big_tcp", "udp_gro_forwarding", "threaded_napi"]
    assert case["sizes"]["gro_max_size"] == LEGACY
    assert case["sizes"]["gro_ipv4_max_size"] == BIG, "BIG TCP is still on"


def test_big_tcp_turned_off_stays_off(facts: dict[str, Any]) -> None:
    case = facts["big_tcp_off"]
    assert case["reported"] == ["gro", "udp_gro_forwarding", "threaded_napi"]
    assert {name: case["sizes"][name] for name in BIG_TCP} == dict.fromkeys(BIG_TCP, LEGACY)
    assert case["sizes"]["gro_max_size"] == BIG, "GRO is still on"


def test_udp_gro_forwarding_turned_off_is_not_turned_on(facts: dict[str, Any]) -> None:
    case = facts["udp_gro_forwarding_off"]
    assert case["reported"] == ["gro", "big_tcp", "threaded_napi"]
    assert case["udp_gro_forwarding"] == "off"


def test_an_agent_restarted_with_features_off_takes_them_back(facts: dict[str, Any]) -> None:
    case = facts["restarted_all_off"]
    assert case["reported"] == []
    sizes = case["sizes"]
    assert {n: sizes[n] for n in ("gro_max_size", *BIG_TCP)} == dict.fromkeys(
        ("gro_max_size", *BIG_TCP), LEGACY
    )
    # The underlay is the node's: podwire turned its UDP GRO forwarding on, and never turns
    # a node's setting off.
    assert case["udp_gro_forwarding"] == "on"


def test_tcp_crosses_kernel_wireguard_with_every_feature_on(facts: dict[str, Any]) -> None:
    traffic = facts["traffic"]
    assert traffic["features"] == [["gro", "big_tcp", "udp_gro_forwarding", "threaded_napi"]] * 2
    assert traffic["bytes_received"] == 16 * 2**20
    assert traffic["intact"], "what arrived is what was sent (SHA-256)"
