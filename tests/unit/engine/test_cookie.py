"""MAC1/MAC2 and cookie replies, XChaCha20-Poly1305, and the handshake rate limiter."""

from __future__ import annotations

from typing import Any

from podwire.agent.engine import constants, cookie, messages, ratelimiter
from podwire.agent.engine.counters import Drop

A4, B4 = "10.0.1.1", "10.0.2.1"
INIT, RESP, COOKIE = (
    constants.MESSAGE_INITIATION,
    constants.MESSAGE_RESPONSE,
    constants.MESSAGE_COOKIE_REPLY,
)


def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert cookie.hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


def test_xchacha20_poly1305_matches_the_draft_aead_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, appendix A.3.1 (first 32 bytes of ciphertext, and the tag)
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = cookie.xaead_encrypt(key, nonce, plaintext, aad)
    assert sealed[:32].hex() == "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert cookie.xaead_decrypt(key, nonce, sealed, aad) == plaintext
    assert cookie.xaead_decrypt(key, nonce, sealed, aad + b"x") is None


def test_under_load_a_cookie_reply_then_a_retry_with_mac2_succeeds(wire: Any, packets: Any) -> None:
    wire.b.device.under_load = True
    packet = packets.ipv4(A4, B4, b"through the cookie")
    wire.send(wire.a, packet)
    # b answered the mac2-less initiation with a cookie reply, not a response.
    assert [s.kind for s in wire.log] == [INIT, COOKIE]
    assert wire.log[0].data[-16:] == bytes(16)
    assert wire.b.device.counters.drops[Drop.BAD_MAC2_NEEDS_COOKIE] == 1
    assert wire.a.device.counters.cookie_replies_received == 1
    assert wire.b.delivered == []

    wire.advance(5.5)  # the retransmit timer resends, now carrying mac2
    retry = wire.sent_by("a", INIT)[1]
    assert retry.data[-16:] != bytes(16)
    assert [s.kind for s in wire.log[2:4]] == [INIT, RESP]
    assert wire.b.delivered == [packet]


def test_a_cookie_is_bound_to_the_source_address(wire: Any, packets: Any) -> None:
    wire.b.device.under_load = True
    wire.send(wire.a, packets.ipv4(A4, B4, b"x"))
    wire.a.endpoint = ("192.0.2.99", 51820)  # a's address changes before it retries
    wire.advance(5.5)
    # mac2 made with a cookie for the old address is not valid from the new one.
    assert [s.kind for s in wire.log[2:4]] == [INIT, COOKIE]
    assert wire.b.delivered == []


def test_bad_mac1_is_dropped_before_any_work(wire: Any, packets: Any) -> None:
    wire.up = False  # capture only
    wire.send(wire.a, packets.ipv4(A4, B4, b"x"))
    initiation = bytearray(wire.log[0].data)
    initiation[-20] ^= 1  # inside mac1
    assert wire.b.device.receive_datagram(bytes(initiation), wire.a.endpoint, 1000.0) == []
    assert wire.b.device.counters.drops[Drop.BAD_MAC1] == 1
    assert wire.b.device.counters.initiations_received == 0


def test_a_cookie_reply_that_answers_nothing_is_refused(wire: Any, rng_factory: Any) -> None:
    generator = cookie.CookieGenerator(wire.b.device.public_key)
    forged = messages.CookieReply(1, bytes(24), bytes(32))
    assert not generator.consume_reply(forged, now=0.0)
    assert wire.a.device.receive_datagram(forged.pack(), wire.b.endpoint, 0.0) == []
    assert wire.a.device.counters.drops[Drop.UNKNOWN_RECEIVER] == 1


def test_the_cookie_secret_rotates_every_two_minutes(rng_factory: Any) -> None:
    checker = cookie.CookieChecker()
    checker.set_public_key(b"k" * 32)
    rng = rng_factory(5)
    source = ("192.0.2.1", 1)
    cookies = [checker._cookie(source, t, rng) for t in (0.0, 119.0, 120.0)]
    assert cookies[0] == cookies[1] != cookies[2]


def test_rate_limiter_token_bucket_per_address() -> None:
    limiter = ratelimiter.RateLimiter()
    now = 100.0
    assert [limiter.allow("192.0.2.1", now) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("192.0.2.2", now)  # another address has its own bucket
    assert not limiter.allow("192.0.2.1", now + 0.04)
    assert limiter.allow("192.0.2.1", now + 0.05)  # 20 per second: one token per 50 ms
    # after a second of rest: the burst of 5, then 20 per second (19 more in 0.99 s)
    allowed = sum(limiter.allow("192.0.2.1", now + 1 + i / 100) for i in range(100))
    assert allowed == 5 + 19


def test_rate_limiter_groups_ipv6_by_64() -> None:
    limiter = ratelimiter.RateLimiter()
    hosts = [f"2001:db8:0:1::{i:x}" for i in range(1, 7)]
    assert [limiter.allow(h, 1.0) for h in hosts] == [True] * 5 + [False]
    assert limiter.allow("2001:db8:0:2::1", 1.0)


def test_rate_limiter_forgets_idle_sources() -> None:
    limiter = ratelimiter.RateLimiter()
    for i in range(50):
        limiter.allow(f"10.0.0.{i}", 1.0)
    limiter.allow("10.1.0.0", 3.0)
    assert len(limiter) == 1


def test_under_load_a_flood_with_valid_cookies_is_rate_limited(wire: Any, packets: Any) -> None:
    wire.b.device.under_load = True
    wire.send(wire.a, packets.ipv4(A4, B4, b"x"))  # gets a the cookie
    wire.up = False  # from now on, capture only
    peer_b = wire.a.device.peers[wire.b.device.public_key]
    for _ in range(8):
        peer_b.last_sent_handshake = None  # let a initiate back to back
        wire.clock.advance(0.001)
        wire.send(wire.a, packets.ipv4(A4, B4, b"x"))
    now = wire.clock.monotonic()
    for sent in wire.sent_by("a", INIT)[1:]:
        wire.b.device.receive_datagram(sent.data, wire.a.endpoint, now)
    counters = wire.b.device.counters
    # Under load every handshake message spends from its source's burst of 5, the first one
    # (answered with the cookie) as well.
    assert counters.drops[Drop.RATE_LIMITED] == 8 - 4
    # the 4 let through still meet the per-peer checks (same whitened timestamp, flood)
    passed = (
        counters.initiations_received
        + counters.drops[Drop.STALE_TIMESTAMP]
        + counters.drops[Drop.FLOOD]
    )
    assert passed == 4


def test_macs_are_compared_in_constant_time(wire: Any, packets: Any, monkeypatch: Any) -> None:
    """A mac1 wrong only in its last byte is refused, and through hmac.compare_digest, whose
    time does not depend on how many leading bytes are right."""
    compared: list[tuple[bytes, bytes]] = []
    real = cookie.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(cookie.hmac, "compare_digest", spy)
    wire.up = False  # capture only
    wire.send(wire.a, packets.ipv4(A4, B4, b"x"))
    initiation = bytearray(wire.log[0].data)
    end_mac1 = len(initiation) - constants.MAC_LEN
    initiation[end_mac1 - 1] ^= 0x80  # mac1's last byte
    assert wire.b.device.receive_datagram(bytes(initiation), wire.a.endpoint, 1000.0) == []
    assert wire.b.device.counters.drops[Drop.BAD_MAC1] == 1
    assert len(compared) == 1
    assert compared[0][1] == bytes(initiation[end_mac1 - constants.MAC_LEN : end_mac1])

    # Under load, mac2 too: wrong in its last byte, the message is answered with a cookie.
    wire.b.device.under_load = True
    initiation[end_mac1 - 1] ^= 0x80
    initiation[-1] ^= 1
    actions = wire.b.device.receive_datagram(bytes(initiation), wire.a.endpoint, 1000.0)
    assert [a.data[0] for a in actions] == [COOKIE]
    assert len(compared) == 3
