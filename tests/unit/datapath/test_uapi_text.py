"""The UAPI's text, both ways: a recorded `get=1` answer parsed, and `set=1` requests formatted."""

from __future__ import annotations

import ipaddress

import pytest

from podwire.agent import keys, wgdevice
from podwire.agent.datapath import uapi

PRIV = bytes(range(1, 33))
PEER_A = bytes([0xA0] * 32)
PEER_B = bytes([0xB0] * 32)

# What wireguard-go answers for a device with two peers (one with no handshake yet).
RECORDED_GET = (
    f"private_key={PRIV.hex()}\n"
    "listen_port=51871\n"
    "fwmark=0\n"
    f"public_key={PEER_A.hex()}\n"
    f"preshared_key={'00' * 32}\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.2:51871\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1184\n"
    "rx_bytes=1096\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.244.1.0/24\n"
    "allowed_ip=fd00:244:1::/64\n"
    f"public_key={PEER_B.hex()}\n"
    "endpoint=[fd00::2]:51871\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
)


def test_get_answer_is_parsed_without_handing_out_the_private_key() -> None:
    state, errno = uapi.parse_get_response(RECORDED_GET)
    assert errno == 0
    assert state.has_private_key
    assert state.public_key == keys.encode_key(keys.public_key_of(PRIV))
    assert not hasattr(state, "private_key")
    assert PRIV.hex() not in repr(state)
    assert (state.listen_port, state.fwmark) == (51871, 0)
    a, b = state.peers
    assert a.public_key == keys.encode_key(PEER_A)
    assert a.endpoint == wgdevice.Endpoint("192.0.2.2", 51871)
    assert a.allowed_ips == (
        ipaddress.ip_network("10.244.1.0/24"),
        ipaddress.ip_network("fd00:244:1::/64"),
    )
    assert a.last_handshake == pytest.approx(1700000000.5)
    assert (a.rx_bytes, a.tx_bytes, a.persistent_keepalive) == (1096, 1184, 25)
    assert not a.has_preshared_key
    assert b.endpoint == wgdevice.Endpoint("fd00::2", 51871)
    assert b.last_handshake is None and b.allowed_ips == ()


def test_device_without_key_or_peers() -> None:
    state, errno = uapi.parse_get_response("listen_port=0\nerrno=0\n\n")
    assert errno == 0
    assert not state.has_private_key and state.public_key is None and state.peers == ()


def test_an_all_zero_private_key_counts_as_none() -> None:
    state, _ = uapi.parse_get_response(f"private_key={'00' * 32}\nerrno=0\n\n")
    assert not state.has_private_key and state.public_key is None


def test_error_answer_gives_its_errno() -> None:
    _, errno = uapi.parse_get_response("errno=22\n\n")
    assert errno == 22


def test_garbage_line_is_refused() -> None:
    with pytest.raises(ValueError, match="without '='"):
        uapi.parse_get_response("hello\n\n")


def test_set_request_is_hex_keys_and_one_blank_line() -> None:
    change = wgdevice.PeerChange(
        keys.encode_key(PEER_A),
        endpoint=wgdevice.Endpoint("fd00::2", 51871),
        allowed_ips=(ipaddress.ip_network("10.244.1.0/24"),),
        replace_allowed_ips=True,
        update_only=True,
    )
    text = uapi.format_set_request(
        private_key=PRIV,
        listen_port=51871,
        fwmark=7,
        peers=[change, wgdevice.PeerChange(keys.encode_key(PEER_B), remove=True)],
    )
    assert text == (
        "set=1\n"
        f"private_key={PRIV.hex()}\n"
        "listen_port=51871\n"
        "fwmark=7\n"
        f"public_key={PEER_A.hex()}\n"
        "update_only=true\n"
        "endpoint=[fd00::2]:51871\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.244.1.0/24\n"
        f"public_key={PEER_B.hex()}\n"
        "remove=true\n"
        "\n"
    )


def test_error_names_what_was_asked_and_no_key(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    client = uapi.UapiClient("wgnone", socket_dir=tmp_path)
    with pytest.raises(uapi.UapiError) as info:
        client.set(private_key=PRIV, listen_port=1)
    err = info.value
    assert err.errno == 2  # no socket
    assert "private key" in str(err) and "listen port 1" in str(err)
    assert PRIV.hex() not in str(err) and keys.encode_key(PRIV) not in str(err)
    assert not client.alive()


def test_a_malformed_public_key_is_refused_before_the_socket(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    client = uapi.UapiClient("wgnone", socket_dir=tmp_path)
    with pytest.raises(uapi.UapiError) as info:
        client.set(peers=[wgdevice.PeerChange("not-a-key", remove=True)])
    assert info.value.errno == 22 and "not-a-key" not in str(info.value)
