"""`rename_to=`, podwire-engine's UAPI extension for key rotation: parsed, applied to the real
Device, refused when the new key is taken, and spoken by the agent's UAPI client."""

from __future__ import annotations

import base64
import errno
import ipaddress
import os

import hypothesis
import pytest
from hypothesis import strategies as st

from podwire.agent import wgdevice
from podwire.agent.datapath import uapi as client
from podwire.agent.engine import device as device_mod
from podwire.agent.engine import noise, uapi

OLD, NEW, OTHER = "a1" * 32, "b2" * 32, "c3" * 32
PRIV = "58" * 32


def req(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n\n").encode()


def make_device(*lines: str) -> device_mod.Device:
    device = device_mod.Device(rng=os.urandom, wall_clock=lambda: 1_767_225_600.0)
    apply(device, f"private_key={PRIV}", *lines)
    return device


def apply(device: device_mod.Device, *lines: str) -> list[tuple[bytes, bytes]]:
    request = uapi.parse_request(req("set=1", *lines))
    assert isinstance(request, uapi.SetRequest)
    return uapi.apply_set(device, request, now=50.0)


def get(device: device_mod.Device) -> str:
    return uapi.serialize_get(device)


# Parsing.


def test_rename_to_follows_its_public_key_and_the_section_goes_on() -> None:
    request = uapi.parse_request(
        req(
            "set=1",
            f"public_key={OLD}",
            f"rename_to={NEW}",
            "endpoint=192.0.2.2:51820",
            "allowed_ip=10.2.0.0/16",
            f"public_key={OTHER}",
        )
    )
    assert isinstance(request, uapi.SetRequest)
    renamed, other = request.peers
    assert (renamed.public_key, renamed.rename_to) == (bytes.fromhex(OLD), bytes.fromhex(NEW))
    assert renamed.endpoint == ("192.0.2.2", 51820)
    assert renamed.allowed_ips == (ipaddress.ip_network("10.2.0.0/16"),)
    assert other.rename_to is None


@pytest.mark.parametrize(
    "lines",
    [
        ["set=1", f"rename_to={NEW}"],  # no peer section
        ["set=1", f"public_key={OLD}", "endpoint=192.0.2.2:1", f"rename_to={NEW}"],  # not next
        ["set=1", f"public_key={OLD}", f"rename_to={NEW}", f"rename_to={OTHER}"],  # twice
        ["set=1", f"public_key={OLD}", "rename_to=1234"],
        ["set=1", f"public_key={OLD}", "rename_to="],
    ],
)
def test_a_misplaced_or_malformed_rename_to_is_einval(lines: list[str]) -> None:
    with pytest.raises(uapi.UapiError) as caught:
        uapi.parse_request(req(*lines))
    assert caught.value.errno == errno.EINVAL


# Applying.


def test_a_rename_keeps_the_peer_and_moves_its_allowed_ips() -> None:
    device = make_device(f"public_key={OLD}", "endpoint=192.0.2.2:51820", "allowed_ip=10.2.0.0/16")
    peer = device.peers[bytes.fromhex(OLD)]
    peer.rx_bytes = 1234
    before = get(device)

    renames = apply(device, f"public_key={OLD}", f"rename_to={NEW}", "allowed_ip=10.3.0.0/16")
    assert renames == [(bytes.fromhex(OLD), bytes.fromhex(NEW))]
    assert device.peers == {bytes.fromhex(NEW): peer}
    assert device.allowed_ips.lookup_v4(int(ipaddress.ip_address("10.2.0.1"))) is peer
    assert device.allowed_ips.lookup_v4(int(ipaddress.ip_address("10.3.0.1"))) is peer
    # get reads as before, with the new key and the section's addition; no new lines.
    assert get(device) == before.replace(OLD, NEW).replace(
        "allowed_ip=10.2.0.0/16\n", "allowed_ip=10.2.0.0/16\nallowed_ip=10.3.0.0/16\n"
    )
    assert peer.handshake.remote_static == bytes.fromhex(NEW)
    assert peer.handshake_requested  # the tick after the set initiates with the new key


def test_an_unknown_old_key_makes_the_section_one_for_the_new_key() -> None:
    device = make_device()
    assert apply(device, f"public_key={OLD}", f"rename_to={NEW}", "allowed_ip=10.2.0.0/16") == []
    assert set(device.peers) == {bytes.fromhex(NEW)}
    assert device.allowed_ips.entries_for_peer(device.peers[bytes.fromhex(NEW)])
    apply(device, f"public_key={OTHER}", f"rename_to={OLD}", "update_only=true")
    assert set(device.peers) == {bytes.fromhex(NEW)}


def test_a_rename_onto_a_taken_key_is_eexist_and_changes_nothing() -> None:
    device = make_device(f"public_key={OLD}", "allowed_ip=10.2.0.0/16", f"public_key={NEW}")
    before = get(device)
    own = device.public_key
    assert own is not None
    for target in (NEW, own.hex()):
        with pytest.raises(uapi.UapiError) as caught:
            # The earlier section and the device keys are not applied either.
            apply(device, "listen_port=7", f"public_key={OTHER}", f"public_key={OLD}",
                  f"rename_to={target}")  # fmt: skip
        assert caught.value.errno == errno.EEXIST
        assert get(device) == before


def test_renames_see_what_the_earlier_sections_left() -> None:
    device = make_device(f"public_key={OLD}", f"public_key={NEW}")
    # NEW is removed first, so OLD may take its key; then NEW is renamed on to OTHER.
    apply(device, f"public_key={NEW}", "remove=true", f"public_key={OLD}", f"rename_to={NEW}",
          f"public_key={NEW}", f"rename_to={OTHER}")  # fmt: skip
    assert set(device.peers) == {bytes.fromhex(OTHER)}
    # A peer made earlier in the same set takes the key: refused.
    with pytest.raises(uapi.UapiError):
        apply(device, f"public_key={NEW}", f"public_key={OTHER}", f"rename_to={NEW}")
    # The device's own key, as the set leaves it, is taken too.
    fresh = os.urandom(32)
    taken = noise.public_key(fresh).hex()
    apply(device, f"public_key={taken}")
    with pytest.raises(uapi.UapiError) as caught:
        apply(device, f"private_key={fresh.hex()}", f"public_key={OTHER}", f"rename_to={taken}")
    assert caught.value.errno == errno.EEXIST
    assert set(device.peers) == {bytes.fromhex(OTHER), bytes.fromhex(taken)}


def test_a_new_private_key_starts_the_previous_keys_grace() -> None:
    device = make_device(f"public_key={OLD}")
    old_public = device.public_key
    apply(device, f"private_key={'59' * 32}")
    assert device.previous is not None
    assert device.previous.identity.public_key == old_public
    assert device.previous.until == 50.0 + device.timer_config.previous_key_grace
    assert f"private_key={'59' * 32}" in get(device)
    assert "58" * 32 not in get(device)


# The agent's client speaks it.


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def test_the_agents_client_encodes_a_rename_the_engine_applies() -> None:
    device = make_device(f"public_key={OLD}", "allowed_ip=10.2.0.0/16")
    change = wgdevice.PeerChange(
        public_key=_b64(NEW),
        renamed_from=_b64(OLD),
        endpoint=wgdevice.parse_endpoint("192.0.2.2:51820"),
        allowed_ips=(ipaddress.ip_network("10.2.0.0/16"),),
        replace_allowed_ips=True,
    )
    text = client.format_set_request(peers=[change])
    assert text.splitlines()[:3] == ["set=1", f"public_key={OLD}", f"rename_to={NEW}"]
    request = uapi.parse_request(text.encode())
    assert isinstance(request, uapi.SetRequest)
    uapi.apply_set(device, request, now=1.0)
    (peer,) = device.peers.values()
    assert peer.public_key == bytes.fromhex(NEW) and peer.endpoint == ("192.0.2.2", 51820)
    # Not renamed (no renamed_from, or the same key): the plain section, as before.
    plain = client.format_set_request(
        peers=[wgdevice.PeerChange(_b64(NEW), renamed_from=_b64(NEW))]
    )
    assert plain == f"set=1\npublic_key={NEW}\n\n"


# Against a naive model: the sections applied one by one, a rename onto a taken key a failure.

_POOL = [bytes([n]) * 32 for n in (0xA1, 0xB2, 0xC3, 0xD4)]
_SECTIONS = st.lists(
    st.tuples(
        st.sampled_from(_POOL),
        st.one_of(st.none(), st.sampled_from(_POOL)),
        st.sampled_from(["", "remove=true", "update_only=true"]),
    ),
    max_size=5,
)


def _naive(
    start: dict[bytes, set[str]], sections: list[tuple[bytes, bytes | None, str]]
) -> dict[bytes, set[str]] | None:
    """Each peer's allowed-ips after the sections, or None where a rename meets a taken key."""
    peers = {key: set(nets) for key, nets in start.items()}
    for key, rename_to, flag in sections:
        if rename_to is not None and key in peers and rename_to != key:
            if rename_to in peers:
                return None
            peers[rename_to] = peers.pop(key)
        key = rename_to or key
        if flag == "remove=true":
            peers.pop(key, None)
        elif flag != "update_only=true":
            peers.setdefault(key, set())
    return peers


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(start=st.sets(st.sampled_from(_POOL)), sections=_SECTIONS)
def test_sets_with_renames_agree_with_the_naive_model(
    start: set[bytes], sections: list[tuple[bytes, bytes | None, str]]
) -> None:
    initial = {key: {f"10.{key[0]}.0.0/16"} for key in start}
    device = make_device(*(f"public_key={k.hex()}\nallowed_ip={n}" for k, (n,) in initial.items()))
    before = get(device)
    lines = []
    for key, rename_to, flag in sections:
        lines.append(f"public_key={key.hex()}")
        lines += [f"rename_to={rename_to.hex()}"] if rename_to is not None else []
        lines += [flag] if flag else []
    expected = _naive(initial, sections)
    if expected is None:
        with pytest.raises(uapi.UapiError) as caught:
            apply(device, *lines)
        assert caught.value.errno == errno.EEXIST
        assert get(device) == before
        return
    apply(device, *lines)
    got = {
        key: {str(net) for net in device.allowed_ips.entries_for_peer(peer)}
        for key, peer in device.peers.items()
    }
    assert got == expected
