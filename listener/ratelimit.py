"""Client-side token buckets per (action, scope) so bursts of Fly calls queue instead of 429ing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

PRUNE_THRESHOLD = 1024  # buckets kept before idle, full ones are dropped


@dataclass(frozen=True, slots=True)
class Rate:
    """A sustained rate and the burst allowed on top of it."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.burst < 1:
            raise ValueError(f"invalid rate {self.per_s}/s burst {self.burst}")

    def with_headroom(self) -> Rate:
        """The pace to keep when a server enforces this rate: one token of its burst in reserve.

        A client pacing at exactly the server's rate keeps the server's bucket at zero, so a
        millisecond of jitter on the wire earns a 429. One spare token absorbs that jitter and
        costs no sustained throughput (only one request of the first burst). With no burst to
        spare, pace 2% under the rate instead.
        """
        if self.burst > 1:
            return Rate(self.per_s, self.burst - 1)
        return Rate(self.per_s * 0.98, 1)


@dataclass(slots=True)
class TokenBucket:
    """One bucket; `reserve` hands out tokens in order, going into debt so waiters queue FIFO."""

    rate: Rate
    tokens: float
    updated: float

    def reserve(self, now: float) -> float:
        """Take one token at `now`; return how long the caller must wait before using it."""
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate.per_s

    def is_idle(self, now: float) -> bool:
        """Full again at `now`: forgetting this bucket changes nothing."""
        self._refill(now)
        return self.tokens >= self.rate.burst

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.rate.burst), self.tokens + elapsed * self.rate.per_s)
        self.updated = max(self.updated, now)


class RateLimiter:
    """Token buckets keyed by (action, scope); `overrides` gives some actions their own rate."""

    def __init__(
        self,
        default: Rate,
        overrides: Mapping[str, Rate] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._default = default
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def reserve(self, action: str, scope: str) -> float:
        """Take a token for (action, scope) now; return the delay before it may be used."""
        now = self._clock()
        key = (action, scope)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= PRUNE_THRESHOLD:
                self._prune(now)
            rate = self._overrides.get(action, self._default)
            bucket = self._buckets[key] = TokenBucket(rate, float(rate.burst), now)
        return bucket.reserve(now)

    async def acquire(self, action: str, scope: str) -> None:
        """Wait (without polling) until a token for (action, scope) is ours."""
        delay = self.reserve(action, scope)
        if delay > 0:
            await self._sleep(delay)

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.is_idle(now)]:
            del self._buckets[key]
