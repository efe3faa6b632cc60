"""Uninstall on the kernel datapath: what an armed agent leaves on its node when it stops.

tests/kernel/guest/uninstall.py runs the agent (`app.assemble` with its real kernel datapath:
two lanes, strictMode, fail-closed) in a namespace of the VM, with a kernel WireGuard peer in
another. No apiserver runs in the VM, so the agent's Kubernetes side is the tests' fakes
(tests/support/agentfakes.py) and the uninstall request is put on its own WireguardNode there,
as `podwire prepare-uninstall` writes it. A stop that is not armed leaves everything (traffic
keeps flowing, with the same keys); an armed stop leaves no WireGuard device, no route of
podwire's (proto 251) in any table, no rule of podwire's, and the multipath hash back to 0,
and keeps the key folder.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def facts(vm: Any) -> dict[str, Any]:
    got: dict[str, Any] = vm.python("uninstall.py", timeout=540)
    print(f"\nuninstall on the kernel datapath: scenario {got['_seconds']}s")
    for key, value in got.items():
        if not key.startswith("_"):
            print(f"  {key}: {value}")
    return got


def test_the_agent_had_made_its_devices_routes_rules_and_hash(facts: dict[str, Any]) -> None:
    made = facts["made"]
    assert made["links"] == ["podwire_wg0 wireguard", "podwire_wg0_1 wireguard"], made
    assert any(line.startswith("unreachable 10.244.0.0/16") for line in made["routes"]), made
    assert any(line.startswith("10.244.2.0/24") for line in made["routes"]), made
    assert made["rules"], made  # strictMode's
    assert made["hash"] == [
        "net.ipv4.fib_multipath_hash_policy=1",
        "net.ipv6.fib_multipath_hash_policy=1",
    ]
    assert facts["ping_started"], "a's pod did not reach b's over the lanes"


def test_a_stop_not_armed_leaves_the_node_and_its_traffic_as_they_were(
    facts: dict[str, Any],
) -> None:
    assert not facts["armed_first"]
    assert facts["after_plain_stop"] == facts["made"]
    assert facts["keys_kept"], "the devices' keys changed"
    assert facts["ping_after_plain_stop"], "traffic stopped with the agent"
    # The next agent finds the devices with their keys, and traffic flows through it too.
    assert facts["second_keys_same"] and facts["ping_second"]


def test_an_armed_stop_leaves_nothing_of_podwire_but_the_key_folder(facts: dict[str, Any]) -> None:
    assert facts["armed"] and facts["condition"] == "True/Armed", facts["condition"]
    assert facts["after_armed_stop"] == {
        "links": [],
        "routes": [],
        "rules": [],
        "hash": [
            "net.ipv4.fib_multipath_hash_policy=0",
            "net.ipv6.fib_multipath_hash_policy=0",
        ],
    }
    assert facts["before"]["hash"] == facts["after_armed_stop"]["hash"]
    assert facts["key_file_kept"]
    # No route left to the other node's pods: nothing is sent, in clear or not.
    assert not facts["ping_after_armed_stop"]
    assert "unreachable" in facts["route_after_armed_stop"].lower(), facts["route_after_armed_stop"]
