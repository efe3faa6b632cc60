"""The advisories on a kernel WireGuard device, and threaded NAPI applied and read back.

The session VM boots with `init_on_alloc=1`, a second one with `=0` (tests/kernel/conftest.py);
in each, tests/kernel/guest/advisories.py brings a kernel device up through the agent's
datapath component and reports its advisories and features beside what the kernel says
(sysfs read with `cat`, /proc/cmdline).
"""

from __future__ import annotations

import time
from typing import Any

import pytest


def _run(vm: Any, label: str) -> dict[str, Any]:
    started = time.monotonic()
    got: dict[str, Any] = vm.python("advisories.py", timeout=400)
    print(f"\nadvisories ({label}): scenario {got['_seconds']}s "
          f"({time.monotonic() - started:.1f}s with the request)")  # fmt: skip
    for case in ("fresh_off", "off", "on", "on_resync"):
        print(f"  {case}: threaded {got[case]['threaded']}, features {got[case]['features']}, "
              f"advisories {sorted(got[case]['advisories'])}")  # fmt: skip
    for case in ("offloads_off", "offloads_on"):
        print(f"  {case}: udp-gro-forwarding {got[case]['ethtool']}, features "
              f"{got[case]['features']}, advisories {sorted(got[case]['advisories'])}")  # fmt: skip
    return got


@pytest.fixture(scope="module")
def on(vm: Any) -> dict[str, Any]:
    return _run(vm, "init_on_alloc=1")


@pytest.fixture(scope="module")
def off(vm_init_on_alloc_off: Any) -> dict[str, Any]:
    return _run(vm_init_on_alloc_off, "init_on_alloc=0")


def test_init_on_alloc_on_is_advised(on: dict[str, Any]) -> None:
    assert "init_on_alloc=1" in on["cmdline"].split()
    for case in ("fresh_off", "off", "on", "on_resync"):
        assert "init_on_alloc" in on[case]["advisories"], case
    assert "init_on_alloc=0" in on["on"]["advisories"]["init_on_alloc"]


def test_init_on_alloc_off_is_not_advised(off: dict[str, Any]) -> None:
    assert "init_on_alloc=0" in off["cmdline"].split()
    for case in ("fresh_off", "off", "on", "on_resync"):
        assert "init_on_alloc" not in off[case]["advisories"], case


def test_threaded_napi_off_is_advised(on: dict[str, Any]) -> None:
    assert on["written_off"] == "", "the test could switch threaded NAPI off by hand"
    case = on["off"]
    assert case["threaded"] == "0"
    assert "threaded_napi" not in case["features"]
    assert "threaded_napi" in case["advisories"]


def test_threaded_napi_is_applied_read_back_and_not_advised(on: dict[str, Any]) -> None:
    for name in ("on", "on_resync"):
        case = on[name]
        assert case["threaded"] == "1", f"{name}: the kernel reads it on"
        assert "threaded_napi" in case["features"], name
        assert "threaded_napi" not in case["advisories"], name


def test_every_feature_on_leaves_no_offload_advice(on: dict[str, Any]) -> None:
    # This kernel (7.x) takes BIG TCP on a WireGuard device and UDP GRO forwarding on veth:
    # with every feature on, only the kernel's command line is left to advise on.
    assert sorted(on["on_resync"]["advisories"]) == ["init_on_alloc"]
    assert {"gro", "big_tcp", "udp_gro_forwarding", "threaded_napi"} <= set(
        on["on_resync"]["features"]
    )


def test_offloads_turned_off_are_advised_and_not_once_on(on: dict[str, Any]) -> None:
    low, high = on["offloads_off"], on["offloads_on"]
    assert low["ethtool"] == "off"
    assert {"gro_limits", "udp_gro_forwarding"} <= set(low["advisories"])
    assert "gro_max_size 65536" in low["advisories"]["gro_limits"]
    assert "big_tcp" not in low["advisories"], "this kernel has BIG TCP: not unavailable"
    assert high["ethtool"] == "on"
    assert not {"gro_limits", "udp_gro_forwarding", "big_tcp"} & set(high["advisories"])
