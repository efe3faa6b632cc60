"""The WireGuard protocol's own numbers, in one place (the paper, sections 5 and 6).

These are the specification: the kernel, wireguard-go and boringtun use the same, and changing
one breaks interoperation or weakens the protocol. Numbers that are this implementation's
choice (queue lengths, batch sizes, the replay bitmap's width, the rate limiter's budget) stand
apart, in the module that uses them. The timers below are the defaults of
`timers.ProtocolTimers`, the set the device runs with, which a test may shorten.
"""

from __future__ import annotations

# The handshake (section 5.4): the Noise construction, and the labels of the mac1 and cookie keys.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Sizes, in bytes.
KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TIMESTAMP_LEN = 12
COOKIE_NONCE_LEN = 24

# The four messages (section 5.4): their types and sizes.
MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive: empty payload, tag only
# A transport message's plaintext is padded to a multiple of this, but never past the MTU.
PADDING_MULTIPLE = 16

# Timers and limits (section 6.1), in messages and seconds.
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
# Added at random to handshake timers, so that two peers' retries do not fall in step.
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
# A responder's cookie secret changes this often, and an initiator uses a cookie at most as long.
COOKIE_REFRESH_TIME = 120.0
# At most this many initiations per second are consumed from one peer.
INITIATIONS_PER_SECOND = 50
