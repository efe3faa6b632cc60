"""The handshake against an independent reference and against pinned vectors.

There are no official WireGuard handshake vectors, so `Reference` below recomputes the Noise
IKpsk2 chain straight from the formulas of the WireGuard paper (section 5.4), with its own
HASH/HMAC/KDF/AEAD written from hashlib, hmac and ChaCha20Poly1305 and nothing from the engine.
The engine's messages and transport keys must equal the reference's byte for byte. The pinned
hex constants were computed once from the same inputs: they catch any later drift.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from podwire.agent.engine import actions, cookie, device, messages, noise
from podwire.agent.engine.counters import Drop

# Fixed inputs: static and ephemeral private keys, indexes, time, psk.
I_STATIC = bytes.fromhex("e0" + "11" * 30 + "41")
R_STATIC = bytes.fromhex("f0" + "22" * 30 + "42")
I_EPHEMERAL = bytes.fromhex("a0" + "33" * 30 + "43")
R_EPHEMERAL = bytes.fromhex("b0" + "44" * 30 + "44")
I_INDEX = 0x01020304
R_INDEX = 0xA0B0C0D0
WALL = 1_767_225_600.0  # 2026-01-01T00:00:00Z, no fraction
PSK = bytes(range(32))

# Computed once from the inputs above (with PSK), then pinned.
PINNED_INITIATION = (
    "01000000040302017aeef61c2f02fc188e891e2890ad34ada7e5f6a566c216bf"
    "e21e2938bc182014fb1008b3d58ef0d33525fccd6e1c71346d2c9e4860cc575d"
    "c05175d16da0c3d98388429a5aeb6b307f0c8566d7f9a0c1a9502eae80ea9a3c"
    "914e253d04303d3c5a295b69cfefef7dc623626e1e863d20dcd9eb56c28e684f"
    "d67312c900000000000000000000000000000000"
)
PINNED_RESPONSE = (
    "02000000d0c0b0a004030201fae50f805602727ae99d3ac9651a44f015d7efbc"
    "65265ebcd06712d2a3acd82900bcbac21f4818a2eb14449b841ae62afa03fd5b"
    "ff417e2066e6ac0b426ad34700000000000000000000000000000000"
)
PINNED_INITIATOR_SEND_KEY = "d8ea57fa4554c6149a52f2dd52a524ed441b75c1e701778eaa4acbd62d185549"
PINNED_INITIATOR_RECEIVE_KEY = "4cd1879b068b4d3a941a9cd0e2c5061ad120156d3fe2790d08b2aa3c15cd303f"


class Reference:
    """WireGuard's handshake, transcribed from the paper's formulas one line at a time."""

    CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    LABEL_MAC1 = b"mac1----"

    @staticmethod
    def HASH(x: bytes) -> bytes:
        return hashlib.blake2s(x).digest()

    @staticmethod
    def MAC(key: bytes, x: bytes) -> bytes:
        return hashlib.blake2s(x, key=key, digest_size=16).digest()

    @staticmethod
    def HMAC(key: bytes, x: bytes) -> bytes:
        return hmac.new(key, x, hashlib.blake2s).digest()

    @classmethod
    def KDF(cls, n: int, key: bytes, x: bytes) -> list[bytes]:
        t0 = cls.HMAC(key, x)
        out: list[bytes] = []
        previous = b""
        for i in range(1, n + 1):
            previous = cls.HMAC(t0, previous + bytes([i]))
            out.append(previous)
        return out

    @staticmethod
    def AEAD(key: bytes, counter: int, plain: bytes, auth: bytes) -> bytes:
        nonce = bytes(4) + counter.to_bytes(8, "little")
        return ChaCha20Poly1305(key).encrypt(nonce, plain, auth)

    @staticmethod
    def DH(private: bytes, public: bytes) -> bytes:
        return x25519.X25519PrivateKey.from_private_bytes(private).exchange(
            x25519.X25519PublicKey.from_public_bytes(public)
        )

    @staticmethod
    def DH_PUBKEY(private: bytes) -> bytes:
        return x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()

    @staticmethod
    def TAI64N(wall: float) -> bytes:
        seconds = int(wall)
        nanos = round((wall - seconds) * 1e9)
        nanos -= nanos % (1 << 24)
        return struct.pack(">QI", 2**62 + 10 + seconds, nanos)

    def handshake(self, psk: bytes) -> dict[str, Any]:
        s_i, s_r, e_i, e_r = I_STATIC, R_STATIC, I_EPHEMERAL, R_EPHEMERAL
        s_i_pub, s_r_pub = self.DH_PUBKEY(s_i), self.DH_PUBKEY(s_r)
        e_i_pub, e_r_pub = self.DH_PUBKEY(e_i), self.DH_PUBKEY(e_r)

        # Initiator to responder (section 5.4.2).
        c_i = self.HASH(self.CONSTRUCTION)
        h_i = self.HASH(c_i + self.IDENTIFIER)
        h_i = self.HASH(h_i + s_r_pub)
        c_i = self.KDF(1, c_i, e_i_pub)[0]
        msg_ephemeral = e_i_pub
        h_i = self.HASH(h_i + msg_ephemeral)
        c_i, k = self.KDF(2, c_i, self.DH(e_i, s_r_pub))
        msg_static = self.AEAD(k, 0, s_i_pub, h_i)
        h_i = self.HASH(h_i + msg_static)
        c_i, k = self.KDF(2, c_i, self.DH(s_i, s_r_pub))
        msg_timestamp = self.AEAD(k, 0, self.TAI64N(WALL), h_i)
        h_i = self.HASH(h_i + msg_timestamp)
        body = struct.pack("<B3xI", 1, I_INDEX) + msg_ephemeral + msg_static + msg_timestamp
        mac1 = self.MAC(self.HASH(self.LABEL_MAC1 + s_r_pub), body)
        initiation = body + mac1 + bytes(16)

        # Responder to initiator (section 5.4.3); the responder's c_r, h_r equal c_i, h_i.
        c_r, h_r = c_i, h_i
        c_r = self.KDF(1, c_r, e_r_pub)[0]
        msg_ephemeral_r = e_r_pub
        h_r = self.HASH(h_r + msg_ephemeral_r)
        c_r = self.KDF(1, c_r, self.DH(e_r, e_i_pub))[0]
        c_r = self.KDF(1, c_r, self.DH(e_r, s_i_pub))[0]
        c_r, tau, k = self.KDF(3, c_r, psk)
        h_r = self.HASH(h_r + tau)
        msg_empty = self.AEAD(k, 0, b"", h_r)
        h_r = self.HASH(h_r + msg_empty)
        body = struct.pack("<B3xII", 2, R_INDEX, I_INDEX) + msg_ephemeral_r + msg_empty
        mac1 = self.MAC(self.HASH(self.LABEL_MAC1 + s_i_pub), body)
        response = body + mac1 + bytes(16)

        # Transport keys (section 5.4.5).
        t_send_i, t_recv_i = self.KDF(2, c_r, b"")
        return {
            "initiation": initiation,
            "response": response,
            "initiator_send": t_send_i,
            "initiator_receive": t_recv_i,
            "final_hash": h_r,
        }


def engine_handshake(psk: bytes, now: float = 50.0) -> dict[str, Any]:
    """The same handshake through the engine's noise and cookie modules."""
    initiator = noise.StaticIdentity(I_STATIC)
    responder = noise.StaticIdentity(R_STATIC)
    hs_i = noise.Handshake(responder.public_key, psk)
    hs_i.precompute(initiator)
    hs_r = noise.Handshake(initiator.public_key, psk)
    hs_r.precompute(responder)

    init = noise.create_initiation(
        hs_i, initiator, ephemeral_private=I_EPHEMERAL, sender_index=I_INDEX, wall_time=WALL
    )
    init_bytes = cookie.CookieGenerator(responder.public_key).stamp(init.pack(), now=now)
    consumed = noise.consume_initiation(
        messages.parse_initiation(init_bytes),
        responder,
        lambda key: hs_r if key == initiator.public_key else None,
        now=now,
    )
    assert consumed is hs_r
    resp = noise.create_response(hs_r, ephemeral_private=R_EPHEMERAL, sender_index=R_INDEX)
    resp_bytes = cookie.CookieGenerator(initiator.public_key).stamp(resp.pack(), now=now)
    noise.consume_response(messages.parse_response(resp_bytes), hs_i, initiator)
    hash_i = hs_i.hash
    kp_i = noise.begin_session(hs_i, now=now)
    kp_r = noise.begin_session(hs_r, now=now)
    return {
        "initiation": init_bytes,
        "response": resp_bytes,
        "initiator_send": kp_i.sending_key,
        "initiator_receive": kp_i.receiving_key,
        "final_hash": hash_i,
        "kp_i": kp_i,
        "kp_r": kp_r,
    }


@pytest.mark.parametrize("psk", [bytes(32), PSK], ids=["no-psk", "psk"])
def test_engine_handshake_equals_the_paper_reference(psk: bytes) -> None:
    ref = Reference().handshake(psk)
    got = engine_handshake(psk)
    assert got["initiation"].hex() == ref["initiation"].hex()
    assert got["response"].hex() == ref["response"].hex()
    assert got["initiator_send"] == ref["initiator_send"]
    assert got["initiator_receive"] == ref["initiator_receive"]
    assert got["final_hash"] == ref["final_hash"]
    # The responder's keys are the initiator's, crossed.
    assert got["kp_r"].receiving_key == ref["initiator_send"]
    assert got["kp_r"].sending_key == ref["initiator_receive"]
    assert got["kp_i"].i_am_the_initiator and not got["kp_r"].i_am_the_initiator
    assert (got["kp_i"].local_index, got["kp_i"].remote_index) == (I_INDEX, R_INDEX)
    assert (got["kp_r"].local_index, got["kp_r"].remote_index) == (R_INDEX, I_INDEX)


def test_engine_handshake_equals_the_pinned_vectors() -> None:
    got = engine_handshake(PSK)
    assert got["initiation"].hex() == PINNED_INITIATION
    assert got["response"].hex() == PINNED_RESPONSE
    assert got["initiator_send"].hex() == PINNED_INITIATOR_SEND_KEY
    assert got["initiator_receive"].hex() == PINNED_INITIATOR_RECEIVE_KEY


def test_the_psk_changes_the_keys_and_a_psk_mismatch_fails() -> None:
    assert engine_handshake(PSK)["initiator_send"] != engine_handshake(bytes(32))["initiator_send"]
    initiator = noise.StaticIdentity(I_STATIC)
    responder = noise.StaticIdentity(R_STATIC)
    hs_i = noise.Handshake(responder.public_key, PSK)
    hs_i.precompute(initiator)
    hs_r = noise.Handshake(initiator.public_key, bytes(32))
    hs_r.precompute(responder)
    init = noise.create_initiation(
        hs_i, initiator, ephemeral_private=I_EPHEMERAL, sender_index=1, wall_time=WALL
    )
    noise.consume_initiation(init, responder, lambda key: hs_r, now=0.0)
    resp = noise.create_response(hs_r, ephemeral_private=R_EPHEMERAL, sender_index=2)
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_response(resp, hs_i, initiator)
    assert err.value.reason == Drop.BAD_AEAD
    assert hs_i.state is noise.HandshakeState.CREATED_INITIATION  # untouched by the failure


def _scripted_rng(ephemeral: bytes, index: int) -> Any:
    def rng(n: int) -> bytes:
        if n == 32:
            return ephemeral
        if n == 4:
            return index.to_bytes(4, "little")
        return bytes(n)

    return rng


def test_two_devices_with_injected_keys_exchange_the_reference_handshake() -> None:
    """Through Device: injected statics, ephemerals and indexes yield the reference bytes,
    and the first data message is encrypted with the reference's initiator sending key."""
    ref = Reference().handshake(PSK)
    at_i, at_r = ("192.0.2.1", 51820), ("192.0.2.9", 51820)
    initiator = device.Device(rng=_scripted_rng(I_EPHEMERAL, I_INDEX), wall_clock=lambda: WALL)
    responder = device.Device(rng=_scripted_rng(R_EPHEMERAL, R_INDEX), wall_clock=lambda: WALL)
    initiator.set_private_key(I_STATIC, now=0.0)
    responder.set_private_key(R_STATIC, now=0.0)
    peer_r = initiator.add_peer(noise.public_key(R_STATIC))
    peer_i = responder.add_peer(noise.public_key(I_STATIC))
    peer_r.preshared_key = peer_i.preshared_key = PSK
    peer_r.endpoint = at_r
    initiator.allowed_ips.insert("10.9.0.0/16", peer_r)
    responder.allowed_ips.insert("10.1.0.0/16", peer_i)
    packet = bytes.fromhex("45000014000000004011000a0a0100010a090001")  # 20-byte IPv4

    [initiation] = initiator.send_packet(packet, 10.0)
    assert initiation == actions.SendDatagram(ref["initiation"], at_r)
    [response] = responder.receive_datagram(initiation.data, at_i, 10.0)
    assert response == actions.SendDatagram(ref["response"], at_i)
    [data] = initiator.receive_datagram(response.data, at_r, 10.0)
    padded = packet + bytes(12)
    expected = struct.pack("<B3xIQ", 4, R_INDEX, 0) + ChaCha20Poly1305(
        ref["initiator_send"]
    ).encrypt(bytes(12), padded, None)
    assert data == actions.SendDatagram(expected, at_r)
    assert responder.receive_datagram(data.data, at_i, 10.0) == [actions.DeliverPacket(packet)]


def test_tai64n_is_big_endian_label_plus_seconds_and_whitened_nanoseconds() -> None:
    stamp = noise.tai64n(WALL + 0.123456789)
    seconds, nanos = struct.unpack(">QI", stamp)
    assert seconds == 0x400000000000000A + int(WALL)
    assert nanos % (1 << 24) == 0 and 0.123456789e9 - (1 << 24) < nanos <= 0.123456789e9
    # Later times compare greater as bytes, which is what the responder checks.
    assert noise.tai64n(WALL + 1) > noise.tai64n(WALL + 0.99) > noise.tai64n(WALL)


def _initiation_at(wall: float, hs_i: noise.Handshake) -> messages.Initiation:
    return noise.create_initiation(
        hs_i,
        noise.StaticIdentity(I_STATIC),
        ephemeral_private=I_EPHEMERAL,
        sender_index=7,
        wall_time=wall,
    )


def _pair() -> tuple[noise.Handshake, noise.Handshake, noise.StaticIdentity]:
    initiator = noise.StaticIdentity(I_STATIC)
    responder = noise.StaticIdentity(R_STATIC)
    hs_i = noise.Handshake(responder.public_key)
    hs_i.precompute(initiator)
    hs_r = noise.Handshake(initiator.public_key)
    hs_r.precompute(responder)
    return hs_i, hs_r, responder


def test_a_replayed_or_older_initiation_is_refused() -> None:
    hs_i, hs_r, responder = _pair()
    first = _initiation_at(WALL + 10, hs_i)
    noise.consume_initiation(first, responder, lambda key: hs_r, now=0.0)
    for message, reason in [
        (first, Drop.STALE_TIMESTAMP),
        (_initiation_at(WALL + 5, hs_i), Drop.STALE_TIMESTAMP),
    ]:
        with pytest.raises(noise.HandshakeError) as err:
            noise.consume_initiation(message, responder, lambda key: hs_r, now=100.0)
        assert err.value.reason == reason
    noise.consume_initiation(_initiation_at(WALL + 11, hs_i), responder, lambda k: hs_r, now=100.0)


def test_initiations_faster_than_fifty_per_second_are_refused_as_a_flood() -> None:
    hs_i, hs_r, responder = _pair()
    noise.consume_initiation(_initiation_at(WALL + 1, hs_i), responder, lambda k: hs_r, now=10.0)
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_initiation(
            _initiation_at(WALL + 2, hs_i), responder, lambda k: hs_r, now=10.01
        )
    assert err.value.reason == Drop.FLOOD
    noise.consume_initiation(_initiation_at(WALL + 3, hs_i), responder, lambda k: hs_r, now=10.03)


def test_an_initiation_from_an_unknown_key_or_with_a_bad_tag_is_refused() -> None:
    hs_i, hs_r, responder = _pair()
    message = _initiation_at(WALL, hs_i)
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_initiation(message, responder, lambda key: None, now=0.0)
    assert err.value.reason == Drop.NO_PEER
    tampered = messages.Initiation(
        message.sender,
        message.ephemeral,
        message.encrypted_static,
        bytes([message.encrypted_timestamp[0] ^ 1]) + message.encrypted_timestamp[1:],
    )
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_initiation(tampered, responder, lambda key: hs_r, now=0.0)
    assert err.value.reason == Drop.BAD_AEAD
    assert hs_r.state is noise.HandshakeState.ZEROED


def test_a_low_order_ephemeral_is_refused() -> None:
    _, hs_r, responder = _pair()
    message = messages.Initiation(1, bytes(32), bytes(48), bytes(28))
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_initiation(message, responder, lambda key: hs_r, now=0.0)
    assert err.value.reason == Drop.BAD_DH


def test_a_previous_identity_answers_with_the_reference_keys() -> None:
    """After a key change the responder's handshake is precomputed for its new key; an
    initiation made to the previous one is consumed with that identity (ss worked out
    afresh) and yields the reference's keys. With the new identity it fails."""
    ref = Reference().handshake(PSK)
    previous = noise.StaticIdentity(R_STATIC)
    current = noise.StaticIdentity(bytes.fromhex("c0" + "55" * 30 + "45"))
    initiator = noise.StaticIdentity(I_STATIC)
    hs_i = noise.Handshake(previous.public_key, PSK)
    hs_i.precompute(initiator)
    hs_r = noise.Handshake(initiator.public_key, PSK)
    hs_r.precompute(current)
    init = noise.create_initiation(
        hs_i, initiator, ephemeral_private=I_EPHEMERAL, sender_index=I_INDEX, wall_time=WALL
    )
    with pytest.raises(noise.HandshakeError):
        noise.consume_initiation(init, current, lambda key: hs_r, now=50.0)
    assert noise.consume_initiation(init, previous, lambda key: hs_r, now=50.0) is hs_r
    assert hs_r.precomputed_for == current.public_key  # the precomputation stays the current's
    resp = noise.create_response(hs_r, ephemeral_private=R_EPHEMERAL, sender_index=R_INDEX)
    noise.consume_response(resp, hs_i, initiator)
    kp_i = noise.begin_session(hs_i, now=50.0)
    assert (kp_i.sending_key, kp_i.receiving_key) == (
        ref["initiator_send"],
        ref["initiator_receive"],
    )
