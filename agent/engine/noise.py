"""The Noise_IKpsk2 handshake and the keypairs it yields (paper section 5.4).

One `Handshake` per peer holds the chaining key and hash between messages. The four message
functions follow the paper's order, each step marked with the Noise token it implements; every
function computes on locals and writes the handshake state only once the message is proven
good, so a forged or broken message leaves the state as it was. No clock is read here: the
wall time for TAI64N and the monotonic time for keypair ages are passed in.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from podwire.agent.engine import constants, fastpath, messages, replay
from podwire.agent.engine.counters import Drop

ZERO_KEY = bytes(constants.KEY_LEN)

# TAI64 labels a second as 2**62 + TAI seconds; the kernel and wireguard-go add the 10 s that
# TAI was ahead of UTC in 1972. We do the same so that a node switching between their datapath
# and ours keeps producing increasing timestamps.
TAI64_BASE = 0x400000000000000A
# Nanoseconds are rounded down to 2**24 ns (just under 1/constants.INITIATIONS_PER_SECOND), as the other
# implementations do, so the timestamp leaks no fine-grained clock.
_TAI64N_WHITENER = ~((1 << 24) - 1)
_TAI64N = struct.Struct(">QI")
_ZERO_NONCE = bytes(12)


class HandshakeError(Exception):
    """A handshake message was refused; `reason` is the drop to count."""

    def __init__(self, reason: Drop, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# The primitives (paper section 5.4).


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.blake2s)


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


def public_key(private_key: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def dh(private_key: bytes, public: bytes) -> bytes:
    """X25519; a peer offering a low-order point (all-zero result) is refused."""
    try:
        shared = x25519.X25519PrivateKey.from_private_bytes(private_key).exchange(
            x25519.X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:
        raise HandshakeError(Drop.BAD_DH, "Diffie-Hellman result is zero") from exc
    if shared == ZERO_KEY:
        raise HandshakeError(Drop.BAD_DH, "Diffie-Hellman result is zero")
    return shared


def aead_encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    # Every handshake key is used once, so its nonce is always 0.
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def aead_decrypt(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeError(Drop.BAD_AEAD, "handshake field failed authentication") from exc


def tai64n(wall_time: float) -> bytes:
    seconds = int(wall_time // 1)
    nanos = int((wall_time - seconds) * 1e9) & _TAI64N_WHITENER
    return _TAI64N.pack(TAI64_BASE + seconds, nanos)


INITIAL_CHAINING_KEY = hash_(constants.CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, constants.IDENTIFIER)


class StaticIdentity:
    """The device's own static key pair, with what the responder side can precompute."""

    __slots__ = ("initial_hash", "private_key", "public_key")

    def __init__(self, private_key: bytes) -> None:
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.initial_hash = hash_(INITIAL_HASH, self.public_key)


class HandshakeState(enum.Enum):
    ZEROED = 0
    CREATED_INITIATION = 1
    CONSUMED_INITIATION = 2
    CREATED_RESPONSE = 3
    CONSUMED_RESPONSE = 4


class Handshake:
    """The handshake with one peer: its keys, and the state between two messages."""

    def __init__(self, remote_static: bytes, preshared_key: bytes = ZERO_KEY) -> None:
        self.remote_static = remote_static
        self.preshared_key = preshared_key
        self.precomputed_static_static = ZERO_KEY
        self.precomputed_for = b""  # the public key of the identity it was computed with
        # Replay and flood protection survive clear(): they guard the next initiation.
        self.latest_timestamp = bytes(constants.TIMESTAMP_LEN)
        self.last_initiation_consumption: float | None = None
        self.clear()

    def clear(self) -> None:
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.ephemeral_private = b""
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0

    def precompute(self, identity: StaticIdentity | None) -> None:
        """Call when either static key changes."""
        self.precomputed_static_static = ZERO_KEY
        self.precomputed_for = b""
        if identity is not None:
            self.precomputed_static_static = _static_static(identity, self.remote_static)
            self.precomputed_for = identity.public_key

    def static_static(self, identity: StaticIdentity) -> bytes:
        """ss with this identity: precomputed for the device's own, worked out afresh for the
        previous one it still answers for after a key change."""
        if identity.public_key == self.precomputed_for:
            return self.precomputed_static_static
        return _static_static(identity, self.remote_static)


def _static_static(identity: StaticIdentity, remote_static: bytes) -> bytes:
    # a low-order peer key leaves it zero: every handshake with it is then refused
    try:
        return dh(identity.private_key, remote_static)
    except HandshakeError:
        return ZERO_KEY


class Keypair:
    """Transport keys from one handshake. The ciphers are built once, not per packet."""

    __slots__ = (
        "created",
        "i_am_the_initiator",
        "local_index",
        "receiving",
        "receiving_key",
        "receiving_valid",
        "remote_index",
        "replay",
        "send_counter",
        "sending",
        "sending_key",
        "sending_valid",
    )

    def __init__(
        self,
        *,
        sending_key: bytes,
        receiving_key: bytes,
        i_am_the_initiator: bool,
        local_index: int,
        remote_index: int,
        created: float,
    ) -> None:
        self.sending_key = sending_key
        self.receiving_key = receiving_key
        # Made once, for the fast path in force (fastpath.seal and fastpath.open take them).
        self.sending = fastpath.cipher(sending_key)
        self.receiving = fastpath.cipher(receiving_key)
        self.sending_valid = True
        self.receiving_valid = True
        self.send_counter = 0
        self.replay = replay.ReplayWindow()
        self.i_am_the_initiator = i_am_the_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created


def create_initiation(
    handshake: Handshake,
    identity: StaticIdentity,
    *,
    ephemeral_private: bytes,
    sender_index: int,
    wall_time: float,
) -> messages.Initiation:
    """First message, initiator to responder (macs left zero for the cookie layer)."""
    static_static = handshake.static_static(identity)
    if static_static == ZERO_KEY:
        raise HandshakeError(Drop.BAD_DH, "no static-static secret with this peer")
    ck = INITIAL_CHAINING_KEY
    h = hash_(INITIAL_HASH, handshake.remote_static)
    # e
    ephemeral = public_key(ephemeral_private)
    ck = kdf1(ck, ephemeral)
    h = hash_(h, ephemeral)
    # es
    ck, key = kdf2(ck, dh(ephemeral_private, handshake.remote_static))
    # s
    encrypted_static = aead_encrypt(key, identity.public_key, h)
    h = hash_(h, encrypted_static)
    # ss
    ck, key = kdf2(ck, static_static)
    # {t}
    encrypted_timestamp = aead_encrypt(key, tai64n(wall_time), h)
    h = hash_(h, encrypted_timestamp)

    handshake.clear()
    handshake.state = HandshakeState.CREATED_INITIATION
    handshake.chaining_key, handshake.hash = ck, h
    handshake.ephemeral_private = ephemeral_private
    handshake.local_index = sender_index
    return messages.Initiation(sender_index, ephemeral, encrypted_static, encrypted_timestamp)


def consume_initiation(
    message: messages.Initiation,
    identity: StaticIdentity,
    find_handshake: Callable[[bytes], Handshake | None],
    *,
    now: float,
) -> Handshake:
    """Responder side of the first message: returns the peer's handshake, now holding the
    initiator's state. `identity` is ours that the message addresses (its mac1 says which);
    `find_handshake` maps the decrypted static key to a peer's handshake."""
    ck = INITIAL_CHAINING_KEY
    h = identity.initial_hash
    # e
    ck = kdf1(ck, message.ephemeral)
    h = hash_(h, message.ephemeral)
    # es
    ck, key = kdf2(ck, dh(identity.private_key, message.ephemeral))
    # s
    remote_static = aead_decrypt(key, message.encrypted_static, h)
    h = hash_(h, message.encrypted_static)
    handshake = find_handshake(remote_static)
    if handshake is None:
        raise HandshakeError(Drop.NO_PEER, "initiation from an unknown static key")
    # ss
    static_static = handshake.static_static(identity)
    if static_static == ZERO_KEY:
        raise HandshakeError(Drop.BAD_DH, "no static-static secret with this peer")
    ck, key = kdf2(ck, static_static)
    # {t}
    timestamp = aead_decrypt(key, message.encrypted_timestamp, h)
    h = hash_(h, message.encrypted_timestamp)

    if timestamp <= handshake.latest_timestamp:
        raise HandshakeError(Drop.STALE_TIMESTAMP, "initiation replayed or older than the last one")
    last = handshake.last_initiation_consumption
    if last is not None and now - last < 1.0 / constants.INITIATIONS_PER_SECOND:
        raise HandshakeError(Drop.FLOOD, "initiations from this peer arrive too fast")

    handshake.clear()
    handshake.state = HandshakeState.CONSUMED_INITIATION
    handshake.chaining_key, handshake.hash = ck, h
    handshake.remote_ephemeral = message.ephemeral
    handshake.remote_index = message.sender
    handshake.latest_timestamp = timestamp
    handshake.last_initiation_consumption = now
    return handshake


def create_response(
    handshake: Handshake, *, ephemeral_private: bytes, sender_index: int
) -> messages.Response:
    """Second message, responder to initiator (macs left zero for the cookie layer)."""
    if handshake.state is not HandshakeState.CONSUMED_INITIATION:
        raise HandshakeError(Drop.BAD_STATE, "no consumed initiation to respond to")
    ck, h = handshake.chaining_key, handshake.hash
    # e
    ephemeral = public_key(ephemeral_private)
    ck = kdf1(ck, ephemeral)
    h = hash_(h, ephemeral)
    # ee
    ck = kdf1(ck, dh(ephemeral_private, handshake.remote_ephemeral))
    # se
    ck = kdf1(ck, dh(ephemeral_private, handshake.remote_static))
    # psk
    ck, tau, key = kdf3(ck, handshake.preshared_key)
    h = hash_(h, tau)
    # {}
    encrypted_nothing = aead_encrypt(key, b"", h)
    h = hash_(h, encrypted_nothing)

    handshake.state = HandshakeState.CREATED_RESPONSE
    handshake.chaining_key, handshake.hash = ck, h
    handshake.ephemeral_private = ephemeral_private
    handshake.local_index = sender_index
    return messages.Response(sender_index, handshake.remote_index, ephemeral, encrypted_nothing)


def consume_response(
    message: messages.Response, handshake: Handshake, identity: StaticIdentity
) -> None:
    """Initiator side of the second message; `handshake` is the one whose local index the
    response names as receiver, `identity` ours that the initiation was made with."""
    if handshake.state is not HandshakeState.CREATED_INITIATION:
        raise HandshakeError(Drop.BAD_STATE, "response without an initiation in flight")
    ck, h = handshake.chaining_key, handshake.hash
    # e
    ck = kdf1(ck, message.ephemeral)
    h = hash_(h, message.ephemeral)
    # ee
    ck = kdf1(ck, dh(handshake.ephemeral_private, message.ephemeral))
    # se
    ck = kdf1(ck, dh(identity.private_key, message.ephemeral))
    # psk
    ck, tau, key = kdf3(ck, handshake.preshared_key)
    h = hash_(h, tau)
    # {}
    aead_decrypt(key, message.encrypted_nothing, h)
    h = hash_(h, message.encrypted_nothing)

    handshake.state = HandshakeState.CONSUMED_RESPONSE
    handshake.chaining_key, handshake.hash = ck, h
    handshake.remote_ephemeral = message.ephemeral
    handshake.remote_index = message.sender


def begin_session(handshake: Handshake, *, now: float) -> Keypair:
    """Derive the transport keys once the handshake is done (paper section 5.4.5) and wipe the
    handshake state; the keypair inherits the handshake's local index."""
    if handshake.state is HandshakeState.CONSUMED_RESPONSE:
        initiator = True
    elif handshake.state is HandshakeState.CREATED_RESPONSE:
        initiator = False
    else:
        raise HandshakeError(Drop.BAD_STATE, "handshake is not complete")
    first, second = kdf2(handshake.chaining_key, b"")
    sending, receiving = (first, second) if initiator else (second, first)
    keypair = Keypair(
        sending_key=sending,
        receiving_key=receiving,
        i_am_the_initiator=initiator,
        local_index=handshake.local_index,
        remote_index=handshake.remote_index,
        created=now,
    )
    handshake.clear()
    return keypair
