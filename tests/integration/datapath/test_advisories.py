"""The UDP GRO forwarding advisory on a real veth underlay: the agent's datapath component
reads the underlay's ethtool feature when its device comes up and at a resync, and advises
while the feature is off; podwire's own setting (the udp_gro_forwarding feature) or the
operator's `ethtool -K` takes the advice away.

ns node                                     ns peer
wg (wireguard-go, the userspace datapath)
veth 192.0.2.1/24 (the underlay) ---------- veth 192.0.2.2/24

Read back with `ethtool -k`, not with podwire's own code.
"""

from __future__ import annotations

import pathlib

from podwire.agent import keystore
from podwire.agent.datapath import component, link, userspace
from podwire.agent.datapath import routes as routes_mod
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

FEATURE = "rx-udp-gro-forwarding"


def _ethtool(ns: netns_mod.Netns, dev: str) -> str:
    for line in ns.run("ethtool", "-k", dev).stdout.splitlines():
        if line.strip().startswith(f"{FEATURE}:"):
            return line.split(":", 1)[1].strip()
    return "absent"


def _datapath(
    factory: netns_mod.NetnsFactory, tmp_path: pathlib.Path, *, udp_gro_forwarding: bool
) -> tuple[component.Datapath, netns_mod.Netns, str]:
    """The agent's datapath component in a node namespace whose underlay has the feature off."""
    node, peer = factory.namespace("n"), factory.namespace("p")
    underlay, _ = factory.veth(node, peer, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    node.run("ethtool", "-K", underlay, FEATURE, "off")
    assert _ethtool(node, underlay) == "off"
    dev = factory.unique("w")
    keys = keystore.KeyStore(tmp_path / "private.key")
    keys.start()

    def open_backend(address: str | None) -> userspace.UserspaceBackend:
        backend = userspace.UserspaceBackend(
            dev,
            engine_command=[tools.path("wireguard-go")],
            engine_env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
            engine_log=tmp_path / "engine.log",
            netns=node.name,
            underlay_address=address,
            wanted=link.Wanted(udp_gro_forwarding=udp_gro_forwarding),
        )
        return backend

    datapath = component.Datapath(
        device=dev,
        listen_port=51871,
        cluster_pod_cidrs=(),
        fail_closed=False,
        open_backend=open_backend,
        routes=routes_mod.Routes(dev, netns=node.name),
        keys=keys,
        netns=node.name,
    )
    try:
        datapath.bring_up("192.0.2.1")
    finally:
        backend = datapath.backend
        if isinstance(backend, userspace.UserspaceBackend) and backend.engine.process:
            factory.processes.append(backend.engine.process)  # the fixture ends it by PID
    return datapath, node, underlay


def _advised(datapath: component.Datapath) -> dict[str, str]:
    return {a.name: a.message for a in datapath.advisories}


def test_udp_gro_forwarding_off_is_advised_until_ethtool_turns_it_on(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    datapath, node, underlay = _datapath(netns, tmp_path, udp_gro_forwarding=False)
    assert "udp_gro_forwarding" not in datapath.features
    assert _ethtool(node, underlay) == "off", "turned off: podwire leaves the underlay alone"
    advised = _advised(datapath)
    assert "udp_gro_forwarding" in advised
    assert underlay in advised["udp_gro_forwarding"]
    assert f"ethtool -K {underlay} rx-udp-gro-forwarding on" in advised["udp_gro_forwarding"]

    node.run("ethtool", "-K", underlay, FEATURE, "on")
    datapath.survey()  # what the resync does
    assert "udp_gro_forwarding" not in _advised(datapath)

    node.run("ethtool", "-K", underlay, FEATURE, "off")
    datapath.survey()
    assert "udp_gro_forwarding" in _advised(datapath), "off again: advised again"


def test_podwires_setting_turns_it_on_and_reports_a_feature_not_advice(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    datapath, node, underlay = _datapath(netns, tmp_path, udp_gro_forwarding=True)
    assert _ethtool(node, underlay) == "on"
    assert "udp_gro_forwarding" in datapath.features
    assert "udp_gro_forwarding" not in _advised(datapath)


def test_no_kernel_only_advice_on_the_userspace_datapath(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    datapath, _, _ = _datapath(netns, tmp_path, udp_gro_forwarding=True)
    assert datapath.kind == "userspace"
    kernel_only = {"big_tcp", "gro_limits", "threaded_napi"}
    assert not kernel_only & set(_advised(datapath)), "a TUN device's GRO is the engine's"
