"""The kernel datapath, in a kernel that has WireGuard: auto picks it, and it carries traffic.

The host may have no WireGuard module (this tier exists for that), so the checks run in the VM
(conftest.py) through tests/kernel/guest/datapath.py, which programs a kernel WireGuard device
the way `podwire-agent` does, with a userspace peer beside it (wireguard-go, then podwire's own
engine), and reports what it saw; each scenario runs once and the tests below read its report.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module", params=["wireguard-go", "podwire-engine"])
def facts(request: pytest.FixtureRequest, vm: Any) -> dict[str, Any]:
    got: dict[str, Any] = vm.python("datapath.py", request.param, timeout=540)
    print(f"\n{request.param}: scenario {got['_seconds']}s, peer started in "
          f"{got['peer_start_seconds']}s, first ping {got['ping_seconds']}s")  # fmt: skip
    return got


def test_auto_picks_the_kernel_wireguard_link(facts: dict[str, Any]) -> None:
    assert (facts["backend"], facts["datapath"]) == ("KernelBackend", "kernel")
    assert facts["link_kind"] == "wireguard", "ip -d link shows the kind the kernel made"
    assert facts["public_key_read_back"], "the private key set over netlink reads back"
    assert facts["mtu"] == 1400 - 60, "MTU: the 1400-byte IPv4 underlay less WireGuard's overhead"


def test_ping_crosses_between_kernel_and_userspace_wireguard(facts: dict[str, Any]) -> None:
    assert facts["ping"], f"no answer from the {facts['peer_kind']} peer:\n{facts['peer_log']}"
    assert facts["ping_back"], "the peer reaches the kernel side too"
    assert facts["routes"] == ["10.244.2.0/24"]
    assert "10.244.2.0/24 dev" in facts["route_show"]
    assert facts["fail_closed"] == ["10.244.0.0/16"]
    assert facts["second_plan_empty"], "a second reconcile pass finds nothing to change"


def test_wg_show_reports_the_handshake_and_the_bytes(facts: dict[str, Any]) -> None:
    key = facts["peer_public_key"]
    assert f"peer: {key}" in facts["wg_show"]
    assert "latest handshake" in facts["wg_show"]
    assert "endpoint: 192.0.2.2:51820" in facts["wg_show"]
    (line,) = facts["wg_handshakes"].splitlines()
    shown_key, when = line.split()
    assert shown_key == key and abs(int(when) - facts["now"]) < 300
    (stats,) = facts["peer_stats"]
    assert stats["public_key"] == key
    assert stats["allowed_ips"] == ["10.244.2.0/24"]
    assert stats["last_handshake"] is not None and stats["rx_bytes"] > 0 and stats["tx_bytes"] > 0


def test_a_restarted_agent_keeps_the_link_and_the_traffic(facts: dict[str, Any]) -> None:
    assert facts["restart_same_link"], "auto on a live kernel link reuses it"
    assert facts["restart_peers"] == [facts["peer_public_key"]]
    assert facts["restart_plan_empty"], "the restarted agent has nothing to change"
    assert facts["restart_ping"]


def test_a_removed_peer_takes_its_route_and_the_pod_range_fails_closed(
    facts: dict[str, Any],
) -> None:
    assert facts["removed_peers"] == [] and facts["removed_routes"] == []
    assert not facts["removed_ping"]
    # The fail-closed route refuses at once (EHOSTUNREACH): nothing leaves by the default route.
    assert "No route to host" in facts["removed_ping_error"]
