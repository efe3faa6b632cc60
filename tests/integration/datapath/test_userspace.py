"""UserspaceBackend and the UAPI client against upstream wireguard-go, nothing else configuring it.

ns a                                        ns b
wg 10.244.1.1/32  ---- tunnel ----          wg 10.244.2.1/32
   route 10.244.2.0/24 (podwire)               route 10.244.1.0/24 (podwire)
veth 192.0.2.1/24 ------ veth ------------- 192.0.2.2/24
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import random

import pytest

from podwire.agent import keys, reconcile, wgdevice
from podwire.agent.datapath import routes as routes_mod
from podwire.agent.datapath import supervisor, userspace
from podwire.agent.netlink import links
from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

PORT = 51871


def _backend(
    factory: netns_mod.NetnsFactory, ns: netns_mod.Netns, dev: str, log: pathlib.Path
) -> userspace.UserspaceBackend:
    return userspace.UserspaceBackend(
        dev,
        engine_command=[tools.path("wireguard-go")],
        engine_env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
        engine_log=log,
        netns=ns.name,
    )


def test_two_wireguard_go_devices_programmed_only_through_the_backend(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    a, b = netns.namespace("a"), netns.namespace("b")
    netns.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24", mtu=1400)
    for ns in (a, b):
        ns.ip("route", "add", "default", "via", "192.0.2.2" if ns is a else "192.0.2.1")
    nodes = {
        a.name: ("192.0.2.1", "10.244.1.0/24", keys.PrivateKey.generate()),
        b.name: ("192.0.2.2", "10.244.2.0/24", keys.PrivateKey.generate()),
    }
    backends: dict[str, userspace.UserspaceBackend] = {}
    for ns in (a, b):
        dev = netns.unique("w")
        backend = _backend(netns, ns, dev, tmp_path / f"{dev}.log")
        backend.ensure_device()
        assert backend.engine.process is not None
        netns.processes.append(backend.engine.process)  # the fixture ends it by PID
        key = nodes[ns.name][2]
        backend.set_private_key(key.raw)
        backend.set_listen_port(PORT)
        assert backend.read().public_key == key.public_key_b64()
        cidr = ipaddress.ip_network(nodes[ns.name][1])
        links.add_address(dev, f"{cidr.network_address + 1}/32", netns=ns.name)
        backends[ns.name] = backend
    # MTU from the 1400-byte IPv4 underlay.
    assert links.link_mtu(backends[a.name].device, netns=a.name) == 1400 - 60

    def peer_of(other: netns_mod.Netns) -> reconcile.DesiredPeer:
        host, cidr, key = nodes[other.name]
        return reconcile.DesiredPeer(
            other.name,
            key.public_key_b64(),
            wgdevice.Endpoint(host, PORT),
            (ipaddress.ip_network(cidr),),
        )

    for ns, other in ((a, b), (b, a)):
        backend = backends[ns.name]
        desired = [peer_of(other)]
        backend.apply(
            reconcile.plan_changes(reconcile.plan_peers(desired, backend.read().peers, synced=True))
        )
        assert reconcile.plan_peers(desired, backend.read().peers, synced=True).empty
        routes = routes_mod.Routes(backend.device, netns=ns.name)
        routes.apply(reconcile.plan_routes(desired, routes.list_routes(), synced=True))
        assert routes.list_routes() == list(desired[0].allowed_ips)

    assert a.ping("10.244.2.1", count=3, timeout=10), "no answer across the tunnel"
    (stats,) = backends[a.name].read().peers
    assert stats.public_key == nodes[b.name][2].public_key_b64()
    assert stats.last_handshake is not None and stats.rx_bytes > 0 and stats.tx_bytes > 0
    assert stats.endpoint == wgdevice.Endpoint("192.0.2.2", PORT)

    # A second backend (an agent restarted) finds the live engine and starts none.
    again = _backend(netns, a, backends[a.name].device, tmp_path / "again.log")
    again.ensure_device()
    assert again.engine.process is None
    assert [p.public_key for p in again.read().peers] == [stats.public_key]

    # Removing the peer takes its allowed-ips with it: the tunnel stops carrying.
    again.apply(reconcile.plan_changes(reconcile.plan_peers([], again.read().peers, synced=True)))
    assert again.read().peers == ()
    assert not a.ping("10.244.2.1", count=1, timeout=2)


def _engine(kind: str) -> tuple[list[str], dict[str, str]]:
    if kind == "wireguard-go":
        return [tools.path("wireguard-go")], {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    return list(supervisor.default_command()), {}


@pytest.mark.parametrize("kind", ["podwire-engine", "wireguard-go"])
def test_the_agents_record_of_the_device_matches_what_the_device_reads_back(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path, kind: str
) -> None:
    """The reconciler diffs against a PeerTable between read-backs: it must end where a real
    device ends, across adds, endpoint changes, allowed-ips moving between peers, removals."""
    ns = netns.namespace("t")
    dev = netns.unique("w")
    command, env = _engine(kind)
    backend = userspace.UserspaceBackend(
        dev,
        engine_command=command,
        engine_env=env,
        engine_log=tmp_path / "e.log",
        netns=ns.name,
        mtu=1420,  # no underlay in this namespace
    )
    backend.ensure_device()
    assert backend.engine.process is not None
    netns.processes.append(backend.engine.process)
    rng = random.Random(4)
    peer_keys = [keys.PrivateKey.generate().public_key_b64() for _ in range(12)]
    nets = [ipaddress.ip_network(f"10.244.{n}.0/24") for n in range(30)]
    table = wgdevice.PeerTable(backend.read().peers)
    for round_ in range(25):
        free = rng.sample(nets, len(nets))
        desired = []
        for i in rng.sample(range(len(peer_keys)), rng.randint(0, 8)):
            take, free = free[: rng.randint(0, 3)], free[3:]
            endpoint = wgdevice.Endpoint(f"192.0.2.{rng.randint(1, 3)}", PORT)
            desired.append(reconcile.DesiredPeer(f"n{i}", peer_keys[i], endpoint, tuple(take)))
        plan = reconcile.plan_peers(desired, table.peers(), synced=round_ % 5 != 4)
        changes = reconcile.plan_changes(plan)
        backend.apply(changes)
        table.apply(changes)
        got = {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in backend.read().peers}
        want = {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in table.peers()}
        assert got == want, f"round {round_}: the record and {kind} disagree"
    # A node that rotated its key: renamed on podwire-engine, remade on wireguard-go (which
    # refuses rename_to=, so the backend sends the request again without it).
    endpoint = wgdevice.Endpoint("192.0.2.1", PORT)
    desired = [reconcile.DesiredPeer("n0", peer_keys[0], endpoint, (nets[0], nets[1]))]
    for changes in (
        reconcile.plan_changes(reconcile.plan_peers(desired, table.peers(), synced=True)),
    ):
        backend.apply(changes)
        table.apply(changes)
    rotated = [
        dataclasses.replace(desired[0], public_key=keys.PrivateKey.generate().public_key_b64())
    ]
    plan = reconcile.plan_peers(rotated, table.peers(), synced=True)
    assert len(plan.rename) == 1 and not plan.add and not plan.remove
    backend.apply(reconcile.plan_changes(plan))
    table.apply(reconcile.plan_changes(plan))
    got = {(p.public_key, p.endpoint, frozenset(p.allowed_ips)) for p in backend.read().peers}
    assert got == {(rotated[0].public_key, endpoint, frozenset({nets[0], nets[1]}))}
    # A device that is replaced is noticed by its identity, cheaply.
    before = backend.identity()
    assert before is not None
    netns_mod.stop_process(backend.engine.process)
    netns_mod.wait_until(lambda: backend.identity() is None, timeout=10, what="the device gone")
