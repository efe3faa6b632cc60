"""The UAPI parser against a table of requests, and fuzzed: it raises UapiError or nothing."""

from __future__ import annotations

import errno
import ipaddress

import hypothesis
import pytest
from hypothesis import strategies as st

from podwire.agent.engine import uapi

K1 = "11" * 32
K2 = "22" * 32
K3 = "33" * 32
ZERO = "00" * 32


def req(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n\n").encode()


def test_get() -> None:
    assert uapi.parse_request(b"get=1\n\n") == uapi.GetRequest()


def test_what_wg_setconf_sends() -> None:
    request = uapi.parse_request(
        req(
            "set=1",
            f"private_key={K1}",
            "listen_port=51820",
            "fwmark=0",
            "replace_peers=true",
            f"public_key={K2}",
            f"preshared_key={K3}",
            "endpoint=192.0.2.2:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.99.0.2/32",
            "allowed_ip=fd00:99::/64",
            f"public_key={K3}",
            "protocol_version=1",
            "endpoint=[fd00::2]:4500",
        )
    )
    assert isinstance(request, uapi.SetRequest)
    assert request.private_key == bytes.fromhex(K1)
    assert (request.listen_port, request.fwmark, request.replace_peers) == (51820, 0, True)
    first, second = request.peers
    assert first.public_key == bytes.fromhex(K2)
    assert first.preshared_key == bytes.fromhex(K3)
    assert first.endpoint == ("192.0.2.2", 51820)
    assert first.persistent_keepalive_interval == 25
    assert first.replace_allowed_ips
    assert first.allowed_ips == (
        ipaddress.ip_network("10.99.0.2/32"),
        ipaddress.ip_network("fd00:99::/64"),
    )
    assert second == uapi.PeerChange(bytes.fromhex(K3), endpoint=("fd00::2", 4500))


def test_keys_stay_out_of_reprs() -> None:
    request = uapi.parse_request(
        req("set=1", f"private_key={K1}", f"public_key={K2}", f"preshared_key={K3}")
    )
    assert K1 not in repr(request) and "\\x11" not in repr(request)
    assert "\\x33" not in repr(request)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["set=1"], uapi.SetRequest()),
        (["set=1", "fwmark="], uapi.SetRequest(fwmark=0)),
        (["set=1", "fwmark=4294967295"], uapi.SetRequest(fwmark=2**32 - 1)),
        (["set=1", "listen_port=0"], uapi.SetRequest(listen_port=0)),
        (["set=1", f"private_key={ZERO}"], uapi.SetRequest(private_key=bytes(32))),
        (["set=1", f"private_key={K1.upper()}"], uapi.SetRequest(private_key=bytes.fromhex(K1))),
        (
            ["set=1", f"public_key={K2}", "remove=true"],
            uapi.SetRequest(peers=(uapi.PeerChange(bytes.fromhex(K2), remove=True),)),
        ),
        (
            ["set=1", f"public_key={K2}", "update_only=true"],
            uapi.SetRequest(peers=(uapi.PeerChange(bytes.fromhex(K2), update_only=True),)),
        ),
        (
            # Lines apply in order: replace_allowed_ips drops what came before it.
            ["set=1", f"public_key={K2}", "allowed_ip=10.0.0.0/8", "replace_allowed_ips=true"],
            uapi.SetRequest(peers=(uapi.PeerChange(bytes.fromhex(K2), replace_allowed_ips=True),)),
        ),
        (
            ["set=1", f"public_key={K2}", "allowed_ip=10.1.2.3/24"],
            uapi.SetRequest(
                peers=(
                    uapi.PeerChange(
                        bytes.fromhex(K2), allowed_ips=(ipaddress.ip_network("10.1.2.0/24"),)
                    ),
                )
            ),
        ),
        (
            ["set=1", f"public_key={K2}", "allowed_ip=-fd00::/64"],
            uapi.SetRequest(
                peers=(
                    uapi.PeerChange(
                        bytes.fromhex(K2), removed_allowed_ips=(ipaddress.ip_network("fd00::/64"),)
                    ),
                )
            ),
        ),
        (
            ["set=1", f"public_key={K2}", "endpoint=[::ffff:192.0.2.9]:1"],
            uapi.SetRequest(peers=(uapi.PeerChange(bytes.fromhex(K2), endpoint=("192.0.2.9", 1)),)),
        ),
    ],
)
def test_valid_sets(lines: list[str], expected: uapi.SetRequest) -> None:
    assert uapi.parse_request(req(*lines)) == expected


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",
        b"\n\n",
        b"get=1",
        b"get=2\n\n",
        b"GET=1\n\n",
        b"get=1\nlisten_port=1\n\n",
        b"set=1",
        b"set=1\nlisten_port\n\n",
        b"set=1\nlisten_port=65536\n\n",
        b"set=1\nlisten_port=-1\n\n",
        b"set=1\nlisten_port=+1\n\n",
        b"set=1\nlisten_port= 1\n\n",
        b"set=1\nlisten_port=1_0\n\n",
        b"set=1\nlisten_port=\n\n",
        b"set=1\nfwmark=4294967296\n\n",
        b"set=1\nfwmark=0x10\n\n",
        b"set=1\nprivate_key=1234\n\n",
        b"set=1\nprivate_key=" + b"g" * 64 + b"\n\n",
        b"set=1\nprivate_key=" + b"11 " * 21 + b"1\n\n",
        b"set=1\nprivate_key=" + b"1" * 66 + b"\n\n",
        b"set=1\nreplace_peers=false\n\n",
        b"set=1\nreplace_peers=TRUE\n\n",
        b"set=1\nbogus=1\n\n",
        b"set=1\nendpoint=192.0.2.1:1\n\n",
        b"set=1\nallowed_ip=10.0.0.0/8\n\n",
        f"set=1\npublic_key={K2}\nlisten_port=1\n\n".encode(),
        f"set=1\npublic_key={K2}\nprivate_key={K1}\n\n".encode(),
        f"set=1\npublic_key={K2}\nreplace_peers=true\n\n".encode(),
        f"set=1\npublic_key={K2}\nremove=false\n\n".encode(),
        f"set=1\npublic_key={K2}\nupdate_only=1\n\n".encode(),
        f"set=1\npublic_key={K2}\nprotocol_version=2\n\n".encode(),
        f"set=1\npublic_key={K2}\npersistent_keepalive_interval=65536\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=192.0.2.1\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=192.0.2.1:65536\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=192.0.2.256:1\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=fd00::1:1\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=[192.0.2.1]:1\n\n".encode(),
        f"set=1\npublic_key={K2}\nendpoint=example.com:1\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=10.0.0.0\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=10.0.0.0/33\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=10.0.0.0/255.0.0.0\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=fd00::/129\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=010.0.0.0/8\n\n".encode(),
        f"set=1\npublic_key={K2}\nallowed_ip=/8\n\n".encode(),
        f"set=1\npublic_key={K2}\n\n\n".encode(),
        "set=1\nlisten_port=\u0661\n\n".encode(),
        b"set=1\nlisten_port=\xff\n\n",
    ],
)
def test_malformed_requests_are_einval(request_bytes: bytes) -> None:
    with pytest.raises(uapi.UapiError) as caught:
        uapi.parse_request(request_bytes)
    assert caught.value.errno == errno.EINVAL


def test_answers_end_with_errno_and_a_blank_line() -> None:
    assert uapi.format_response(errno=0) == b"errno=0\n\n"
    assert uapi.format_response(errno=22, body="a=b\n") == b"a=b\nerrno=22\n\n"


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [(("192.0.2.1", 51820), "192.0.2.1:51820"), (("fd00::1", 1), "[fd00::1]:1")],
)
def test_endpoint_round_trip(endpoint: tuple[str, int], text: str) -> None:
    assert uapi.format_endpoint(endpoint) == text
    assert uapi.parse_endpoint(text) == endpoint


_KEYS = [
    "private_key", "listen_port", "fwmark", "replace_peers", "public_key", "remove",
    "update_only", "preshared_key", "endpoint", "persistent_keepalive_interval",
    "replace_allowed_ips", "allowed_ip", "protocol_version", "get", "set", "",
]  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(
        ["true", "1", "0", "", K1, ZERO, "65535", "[fd00::1]:1", "10.0.0.0/8", "-::/0"]
    ),
    st.text(max_size=80),
    st.from_regex(r"\[?[0-9a-f:.]{0,40}\]?(:[0-9]{0,6})?(/[0-9]{0,4})?", fullmatch=True),
)
_LINES = st.tuples(st.sampled_from(_KEYS) | st.text(max_size=20), _VALUES).map(
    lambda kv: f"{kv[0]}={kv[1]}"
)


@hypothesis.settings(max_examples=1500, deadline=None)
@hypothesis.given(
    operation=st.sampled_from(["set=1", "get=1", "set=2"]) | st.text(max_size=10),
    lines=st.lists(_LINES | st.text(max_size=40), max_size=12),
    ending=st.sampled_from(["\n\n", "\n", ""]),
)
def test_fuzz_structured(operation: str, lines: list[str], ending: str) -> None:
    data = "\n".join([operation, *lines]) + ending
    try:
        uapi.parse_request(data.encode("utf-8", "surrogatepass"))
    except uapi.UapiError as exc:
        assert exc.errno == errno.EINVAL


@hypothesis.settings(max_examples=1500, deadline=None)
@hypothesis.given(data=st.binary(max_size=400))
def test_fuzz_bytes(data: bytes) -> None:
    try:
        uapi.parse_request(b"set=1\n" + data)
        uapi.parse_request(data)
    except uapi.UapiError as exc:
        assert exc.errno == errno.EINVAL
