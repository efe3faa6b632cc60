"""MAC1, MAC2 and the cookie reply: WireGuard's DoS mitigation (paper section 5.3 and 5.4.7).

Every handshake message carries mac1, keyed by the receiver's public key, so a responder can
drop garbage before any Diffie-Hellman. Under load, it also demands mac2, keyed by a cookie
that only a sender able to receive at its source address can hold; a sender without one gets a
cookie reply, encrypted with XChaCha20-Poly1305. The responder side is `CookieChecker` (one per
device); the initiator side is `CookieGenerator` (one per peer).
"""

from __future__ import annotations

import enum
import functools
import hmac
import ipaddress
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from podwire.agent.engine import constants, messages, noise
from podwire.agent.engine.actions import Endpoint

# HChaCha20 (draft-irtf-cfrg-xchacha section 2.2): the ChaCha20 block function without the
# final addition, keeping words 0-3 and 12-15. It turns a 24-byte nonce into a subkey for the
# plain ChaCha20-Poly1305 that `cryptography` offers.

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_WORDS8 = struct.Struct("<8I")
_WORDS4 = struct.Struct("<4I")
_M32 = 0xFFFFFFFF


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _M32
    x = s[d] ^ s[a]
    s[d] = ((x << 16) | (x >> 16)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    x = s[b] ^ s[c]
    s[b] = ((x << 12) | (x >> 20)) & _M32
    s[a] = (s[a] + s[b]) & _M32
    x = s[d] ^ s[a]
    s[d] = ((x << 8) | (x >> 24)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    x = s[b] ^ s[c]
    s[b] = ((x << 7) | (x >> 25)) & _M32


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    s = [*_SIGMA, *_WORDS8.unpack(key), *_WORDS4.unpack(nonce16)]
    for _ in range(10):
        _quarter_round(s, 0, 4, 8, 12)
        _quarter_round(s, 1, 5, 9, 13)
        _quarter_round(s, 2, 6, 10, 14)
        _quarter_round(s, 3, 7, 11, 15)
        _quarter_round(s, 0, 5, 10, 15)
        _quarter_round(s, 1, 6, 11, 12)
        _quarter_round(s, 2, 7, 8, 13)
        _quarter_round(s, 3, 4, 9, 14)
    return _WORDS8.pack(*s[0:4], *s[12:16])


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(bytes(4) + nonce24[16:], plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(bytes(4) + nonce24[16:], ciphertext, ad)
    except InvalidTag:
        return None


@functools.lru_cache(maxsize=4096)
def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """What a cookie is bound to: the source address and port."""
    host, port = endpoint
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = host.encode("utf-8", "replace")
    return packed + (port & 0xFFFF).to_bytes(2, "big")


def mac1_key(public: bytes) -> bytes:
    return noise.hash_(constants.LABEL_MAC1, public)


def cookie_key(public: bytes) -> bytes:
    return noise.hash_(constants.LABEL_COOKIE, public)


_NONCE_PREFIX_LEN = 16
_NONCE_SUFFIX_LEN = constants.COOKIE_NONCE_LEN - _NONCE_PREFIX_LEN


class MacCheck(enum.Enum):
    INVALID = 0
    VALID_MAC1 = 1
    VALID_MAC2 = 2


class CookieChecker:
    """Responder side: checks the macs of incoming handshake messages, answers with cookies."""

    def __init__(self) -> None:
        self._mac1_key = b""
        self._cookie_key = b""
        self._secret = b""
        self._secret_birth: float | None = None
        # Cookie replies share one HChaCha20 subkey (in pure Python it costs as much as a
        # Diffie-Hellman): the nonce is a random prefix, fixed until the secret changes,
        # then a counter, so no nonce repeats under a subkey.
        self._reply_prefix = b""
        self._reply_aead: ChaCha20Poly1305 | None = None
        self._reply_counter = 0

    def set_public_key(self, public: bytes | None) -> None:
        """Call whenever the device's key changes."""
        self._mac1_key = mac1_key(public) if public is not None else b""
        self._cookie_key = cookie_key(public) if public is not None else b""
        self._reply_aead = None

    def check(
        self,
        data: bytes,
        source: Endpoint,
        *,
        check_mac2: bool,
        now: float,
        rng: Callable[[int], bytes],
    ) -> MacCheck:
        """Check a handshake message's macs; mac2 only when `check_mac2` (under load)."""
        if not self._mac1_key:
            return MacCheck.INVALID
        end_mac1 = len(data) - 2 * constants.MAC_LEN
        end_mac2 = len(data) - constants.MAC_LEN
        # Constant time: a comparison that stops at the first wrong byte tells a forger how
        # many leading bytes are right.
        if not hmac.compare_digest(
            noise.mac(self._mac1_key, data[:end_mac1]), data[end_mac1:end_mac2]
        ):
            return MacCheck.INVALID
        if not check_mac2:
            return MacCheck.VALID_MAC1
        cookie = self._cookie(source, now, rng)
        if not hmac.compare_digest(noise.mac(cookie, data[:end_mac2]), data[end_mac2:]):
            return MacCheck.VALID_MAC1
        return MacCheck.VALID_MAC2

    def create_reply(
        self,
        data: bytes,
        sender_index: int,
        source: Endpoint,
        *,
        now: float,
        rng: Callable[[int], bytes],
    ) -> messages.CookieReply:
        """The cookie reply to a handshake message (`data`) that lacked a valid mac2."""
        end_mac1 = len(data) - 2 * constants.MAC_LEN
        mac1 = data[end_mac1 : end_mac1 + constants.MAC_LEN]
        cookie = self._cookie(source, now, rng)
        aead = self._reply_aead
        if aead is None:
            self._reply_prefix = rng(_NONCE_PREFIX_LEN)
            aead = ChaCha20Poly1305(hchacha20(self._cookie_key, self._reply_prefix))
            self._reply_aead = aead
            self._reply_counter = 0
        suffix = self._reply_counter.to_bytes(_NONCE_SUFFIX_LEN, "little")
        self._reply_counter += 1
        encrypted = aead.encrypt(bytes(4) + suffix, cookie, mac1)
        return messages.CookieReply(sender_index, self._reply_prefix + suffix, encrypted)

    def _cookie(self, source: Endpoint, now: float, rng: Callable[[int], bytes]) -> bytes:
        if self._secret_birth is None or now - self._secret_birth >= constants.COOKIE_REFRESH_TIME:
            self._secret = rng(32)
            self._secret_birth = now
            self._reply_aead = None
        return noise.mac(self._secret, endpoint_bytes(source))


class CookieGenerator:
    """Initiator side, per peer: stamps our handshake messages with mac1 (and mac2 when we
    hold a fresh cookie from that peer) and takes in the peer's cookie replies."""

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self._cookie = b""
        self._cookie_birth: float | None = None
        self._last_mac1: bytes | None = None

    def retarget(self, remote_public: bytes) -> None:
        """Call when the peer takes a new key: the macs are keyed by it from now on. A cookie
        held stays: it vouches for our address to that responder, whatever its key."""
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self._last_mac1 = None  # a reply to a message for the old key cannot be opened

    def stamp(self, data: bytes, *, now: float) -> bytes:
        """`data` is a packed handshake message with zero macs; returns it with macs set."""
        end_mac1 = len(data) - 2 * constants.MAC_LEN
        body = data[:end_mac1]
        mac1 = noise.mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie_birth is None or now - self._cookie_birth >= constants.COOKIE_REFRESH_TIME:
            return body + mac1 + bytes(constants.MAC_LEN)
        return body + mac1 + noise.mac(self._cookie, body + mac1)

    def consume_reply(self, reply: messages.CookieReply, *, now: float) -> bool:
        """Take in a cookie reply; False if it does not answer our latest message."""
        if self._last_mac1 is None:
            return False
        cookie = xaead_decrypt(
            self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_birth = now
        self._last_mac1 = None
        return True
