"""Per-source rate limit on handshake messages, applied under load (a token bucket per address,
as the kernel's ratelimiter). IPv6 sources are grouped by /64, since one host commonly owns a
whole /64. Times are monotonic seconds passed in; buckets are kept in integer nanoseconds so
that repeated additions do not drift."""

from __future__ import annotations

import functools
import ipaddress

# Implementation constants, the kernel's (the paper leaves the limiter's budget open): a
# source's rate and burst; forget idle sources after a second; refuse past this many sources.
PACKETS_PER_SECOND = 20
PACKETS_BURST = 5
IDLE_SECONDS = 1.0
MAX_ENTRIES = 65536

_NS = 1_000_000_000


class RateLimiter:
    def __init__(
        self, *, packets_per_second: int = PACKETS_PER_SECOND, burst: int = PACKETS_BURST
    ) -> None:
        self._cost = _NS // packets_per_second
        self._max_tokens = self._cost * burst
        # key -> [last time (ns), tokens (ns)]
        self._buckets: dict[bytes, list[int]] = {}
        self._last_gc = 0

    def allow(self, host: str, now: float) -> bool:
        """Whether one more handshake message from `host` may be processed at `now`."""
        now_ns = int(now * _NS)
        if now_ns - self._last_gc >= IDLE_SECONDS * _NS:
            self._gc(now_ns)
        key = _key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_ENTRIES:
                return False
            self._buckets[key] = [now_ns, self._max_tokens - self._cost]
            return True
        tokens = min(self._max_tokens, bucket[1] + max(0, now_ns - bucket[0]))
        bucket[0] = now_ns
        if tokens < self._cost:
            bucket[1] = tokens
            return False
        bucket[1] = tokens - self._cost
        return True

    def _gc(self, now_ns: int) -> None:
        self._last_gc = now_ns
        idle = IDLE_SECONDS * _NS
        for key in [k for k, b in self._buckets.items() if now_ns - b[0] > idle]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@functools.lru_cache(maxsize=4096)
def _key(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.encode("utf-8", "replace")
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return mapped.packed if mapped is not None else address.packed[:8]
    return address.packed
