"""Which of the node's kernel settings the agent advises on, from what it read (agent/advisories.py)."""

from __future__ import annotations

import pytest

from podwire.agent import advisories

BIG = 196608
LEGACY = 65536
ALL_BIG = {
    "gso_max_size": BIG,
    "gro_max_size": BIG,
    "tso_max_size": 524280,
    "gso_ipv4_max_size": BIG,
    "gro_ipv4_max_size": BIG,
}
ALL_FEATURES = ("gro", "big_tcp", "udp_gro_forwarding", "threaded_napi")


def kernel(**kw: object) -> advisories.Facts:
    """A kernel-datapath node with every feature in force, changed by kw."""
    base: dict[str, object] = {
        "datapath": "kernel",
        "device": "podwire_wg0",
        "features": ALL_FEATURES,
        "cmdline": "root=/dev/sda1 quiet",
        "kernel_config": "CONFIG_INIT_ON_ALLOC_DEFAULT_ON=n\n",
        "underlay_device": "eth0",
        "udp_gro_forwarding": True,
        "sizes": ALL_BIG,
        "threaded_napi": True,
    }
    return advisories.Facts(**{**base, **kw})  # type: ignore[arg-type]


def names(facts: advisories.Facts) -> list[str]:
    return [a.name for a in advisories.find(facts)]


def test_a_node_with_everything_in_force_gets_no_advice() -> None:
    assert advisories.find(kernel()) == ()


@pytest.mark.parametrize(
    ("cmdline", "config", "on"),
    [
        ("quiet init_on_alloc=1", None, True),
        ("quiet init_on_alloc=0", "CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\n", False),
        ("init_on_alloc=1 init_on_alloc=0", None, False),  # the kernel takes the last
        ("init_on_alloc=on", None, True),
        ("quiet", "CONFIG_X=y\nCONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\nCONFIG_Y=m\n", True),
        ("quiet", "# CONFIG_INIT_ON_ALLOC_DEFAULT_ON is not set\n", False),
        ("quiet", None, None),  # neither says: unknown
        (None, None, None),
        ("xinit_on_alloc=1", None, None),  # another parameter's name
    ],
)
def test_init_on_alloc_from_the_command_line_then_the_kernel_config(
    cmdline: str | None, config: str | None, on: bool | None
) -> None:
    assert advisories.init_on_alloc(cmdline, config) is on


def test_init_on_alloc_on_is_advised_with_what_to_boot_with() -> None:
    (advice,) = advisories.find(kernel(cmdline="quiet init_on_alloc=1"))
    assert advice.name == "init_on_alloc"
    assert "init_on_alloc=0" in advice.message


def test_init_on_alloc_unknown_is_not_advised() -> None:
    assert names(kernel(cmdline="quiet", kernel_config=None)) == []


def test_init_on_alloc_applies_to_both_datapaths() -> None:
    facts = kernel(datapath="userspace", cmdline="init_on_alloc=1")
    assert names(facts) == ["init_on_alloc"]


def test_udp_gro_forwarding_off_on_the_underlay_is_advised() -> None:
    facts = kernel(udp_gro_forwarding=False, features=("gro", "big_tcp", "threaded_napi"))
    (advice,) = advisories.find(facts)
    assert advice.name == "udp_gro_forwarding"
    assert "eth0" in advice.message and "rx-udp-gro-forwarding on" in advice.message


@pytest.mark.parametrize("state", [True, None])
def test_udp_gro_forwarding_on_or_not_offered_is_not_advised(state: bool | None) -> None:
    assert (
        names(kernel(udp_gro_forwarding=state, features=("gro", "big_tcp", "threaded_napi"))) == []
    )


def test_big_tcp_on_a_kernel_without_its_sizes_is_advised() -> None:
    old = {"gso_max_size": LEGACY, "gro_max_size": BIG, "tso_max_size": 524280}
    (advice,) = advisories.find(
        kernel(sizes=old, features=("gro", "udp_gro_forwarding", "threaded_napi"))
    )
    assert advice.name == "big_tcp"
    assert "gso_ipv4_max_size" in advice.message


def test_big_tcp_on_a_device_that_refuses_the_size_is_advised() -> None:
    sizes = {**ALL_BIG, "tso_max_size": LEGACY, "gso_max_size": LEGACY,
             "gso_ipv4_max_size": LEGACY, "gro_ipv4_max_size": LEGACY}  # fmt: skip
    facts = kernel(sizes=sizes, features=("gro", "udp_gro_forwarding", "threaded_napi"))
    assert names(facts) == ["big_tcp"], "the send sizes cannot grow: not a limits advisory"
    assert "6.13" in advisories.find(facts)[0].message


def test_big_tcp_turned_off_where_available_is_a_limits_advisory() -> None:
    sizes = {**ALL_BIG, "gso_max_size": LEGACY, "gso_ipv4_max_size": LEGACY,
             "gro_ipv4_max_size": LEGACY}  # fmt: skip
    facts = kernel(sizes=sizes, features=("gro", "udp_gro_forwarding", "threaded_napi"))
    (advice,) = advisories.find(facts)
    assert advice.name == "gro_limits"
    assert "gso_max_size 65536" in advice.message and "gro_max_size" not in advice.message


def test_gro_turned_off_is_a_limits_advisory() -> None:
    facts = kernel(sizes={**ALL_BIG, "gro_max_size": LEGACY})
    (advice,) = advisories.find(facts)
    assert (advice.name, advice.message.split(" on ")[0]) == ("gro_limits", "gro_max_size 65536")


def test_sizes_above_podwires_are_not_advised() -> None:
    assert names(kernel(sizes=dict.fromkeys(ALL_BIG, 524280))) == []


def test_sizes_unread_are_not_advised() -> None:
    assert names(kernel(sizes=None, features=("udp_gro_forwarding", "threaded_napi"))) == []


def test_sizes_on_the_userspace_datapath_are_not_advised() -> None:
    low = dict.fromkeys(ALL_BIG, LEGACY)
    for sizes in (low, {}):
        assert names(kernel(datapath="userspace", sizes=sizes, features=())) == []


def test_threaded_napi_off_is_advised() -> None:
    (advice,) = advisories.find(kernel(threaded_napi=False, features=ALL_FEATURES[:3]))
    assert advice.name == "threaded_napi"
    assert "/sys/class/net/podwire_wg0/threaded" in advice.message


@pytest.mark.parametrize(
    ("state", "datapath"), [(None, "kernel"), (True, "kernel"), (False, "userspace")]
)
def test_threaded_napi_on_unavailable_or_userspace_is_not_advised(
    state: bool | None, datapath: str
) -> None:
    assert names(kernel(threaded_napi=state, datapath=datapath, features=ALL_FEATURES[:3])) == []


def test_every_advisory_at_once_in_a_fixed_order() -> None:
    facts = kernel(
        cmdline="init_on_alloc=1",
        udp_gro_forwarding=False,
        sizes={"gso_max_size": LEGACY, "gro_max_size": LEGACY, "tso_max_size": 524280},
        threaded_napi=False,
        features=(),
    )
    assert names(facts) == list(advisories.NAMES)
    assert all(a.message for a in advisories.find(facts))
