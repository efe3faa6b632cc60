"""A parsed set applied to the real Device, and the Device written back as `wg` reads it."""

from __future__ import annotations

import ipaddress
import os

import hypothesis
import pytest
from hypothesis import strategies as st

from podwire.agent.engine import device as device_mod
from podwire.agent.engine import uapi

WALL = 1_767_225_600.25


def make_device() -> device_mod.Device:
    return device_mod.Device(rng=os.urandom, wall_clock=lambda: WALL)


def apply(device: device_mod.Device, *lines: str) -> None:
    request = uapi.parse_request(("\n".join(["set=1", *lines]) + "\n\n").encode())
    assert isinstance(request, uapi.SetRequest)
    uapi.apply_set(device, request, now=0.0)


def get(device: device_mod.Device) -> list[str]:
    return uapi.serialize_get(device).splitlines()


P1, P2 = "a1" * 32, "b2" * 32
PRIV = "58" * 32


def test_configure_and_read_back() -> None:
    device = make_device()
    apply(
        device,
        f"private_key={PRIV}", "listen_port=51820", "fwmark=7",
        f"public_key={P1}", f"preshared_key={'c3' * 32}", "endpoint=[fd00::2]:51820",
        "persistent_keepalive_interval=25", "allowed_ip=10.99.0.2/32", "allowed_ip=fd00:99::/64",
        f"public_key={P2}", "endpoint=192.0.2.9:1",
    )  # fmt: skip
    device.peers[bytes.fromhex(P1)].last_handshake_wall = WALL
    assert get(device) == [
        f"private_key={PRIV}",
        "listen_port=51820",
        "fwmark=7",
        f"public_key={P1}",
        f"preshared_key={'c3' * 32}",
        "protocol_version=1",
        "endpoint=[fd00::2]:51820",
        "last_handshake_time_sec=1767225600",
        "last_handshake_time_nsec=250000000",
        "tx_bytes=0",
        "rx_bytes=0",
        "persistent_keepalive_interval=25",
        "allowed_ip=10.99.0.2/32",
        "allowed_ip=fd00:99::/64",
        f"public_key={P2}",
        f"preshared_key={'00' * 32}",
        "protocol_version=1",
        "endpoint=192.0.2.9:1",
        "last_handshake_time_sec=0",
        "last_handshake_time_nsec=0",
        "tx_bytes=0",
        "rx_bytes=0",
        "persistent_keepalive_interval=0",
    ]


def test_peer_operations() -> None:
    device = make_device()
    apply(device, f"private_key={PRIV}", f"public_key={P1}", "allowed_ip=10.0.0.0/8")
    # update_only does not create; remove removes; replace_allowed_ips replaces.
    apply(device, f"public_key={P2}", "update_only=true", "endpoint=192.0.2.1:1")
    assert set(device.peers) == {bytes.fromhex(P1)}
    apply(
        device,
        f"public_key={P1}",
        "update_only=true",
        "replace_allowed_ips=true",
        "allowed_ip=10.1.0.0/16",
    )
    peer = device.peers[bytes.fromhex(P1)]
    assert device.allowed_ips.entries_for_peer(peer) == [ipaddress.ip_network("10.1.0.0/16")]
    apply(device, f"public_key={P1}", "allowed_ip=10.2.0.0/16", "allowed_ip=-10.1.0.0/16")
    assert device.allowed_ips.entries_for_peer(peer) == [ipaddress.ip_network("10.2.0.0/16")]
    # An address given to one peer is taken from the other.
    apply(device, f"public_key={P2}", "allowed_ip=10.2.0.0/16")
    assert device.allowed_ips.entries_for_peer(peer) == []
    apply(device, f"public_key={P2}", "remove=true")
    assert set(device.peers) == {bytes.fromhex(P1)}
    apply(device, "replace_peers=true")
    assert device.peers == {}
    # A section for our own public key is ignored.
    assert device.public_key is not None
    apply(device, f"public_key={device.public_key.hex()}")
    assert device.peers == {}
    apply(device, f"private_key={'00' * 32}", f"public_key={P1}", f"preshared_key={'00' * 32}")
    assert device.private_key is None
    assert not any(line.startswith("private_key=") for line in get(device))
    assert f"preshared_key={'00' * 32}" in get(device)


def test_a_rejected_set_changes_nothing() -> None:
    device = make_device()
    apply(device, f"private_key={PRIV}", "listen_port=1")
    before = get(device)
    bad = f"set=1\nlisten_port=2\npublic_key={P1}\nallowed_ip=10.0.0.0/40\n\n".encode()
    with pytest.raises(uapi.UapiError):
        uapi.parse_request(bad)
    assert get(device) == before


_PREFIXES = st.one_of(
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    peers=st.dictionaries(
        st.binary(min_size=32, max_size=32),
        st.tuples(st.lists(_PREFIXES, max_size=4), st.integers(0, 65535), st.booleans()),
        max_size=4,
    )
)
def test_get_then_set_round_trips(
    peers: dict[bytes, tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], int, bool]],
) -> None:
    device = make_device()
    device.set_private_key(bytes.fromhex(PRIV), now=0.0)
    for key, (prefixes, keepalive, v6) in peers.items():
        if key == device.public_key:
            continue
        peer = device.add_peer(key)
        peer.persistent_keepalive_interval = keepalive
        peer.endpoint = ("fd00::1", keepalive) if v6 else ("192.0.2.1", keepalive)
        for prefix in prefixes:
            device.allowed_ips.insert(prefix, peer)
    shown = uapi.serialize_get(device)
    # What get printed, minus the read-only statistics, is a valid set that rebuilds it.
    settable = [
        line for line in shown.splitlines()
        if line.split("=")[0] not in {"last_handshake_time_sec", "last_handshake_time_nsec", "tx_bytes", "rx_bytes"}
    ]  # fmt: skip
    copy = make_device()
    request = uapi.parse_request(
        ("set=1\n" + "".join(f"{line}\n" for line in settable) + "\n").encode()
    )
    assert isinstance(request, uapi.SetRequest)
    uapi.apply_set(copy, request, now=0.0)
    assert uapi.serialize_get(copy) == shown
