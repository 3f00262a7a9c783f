"""Admission control per upstream: InCountry's quotas, enforced before traffic leaves.

All applications behind the proxy share one client IP, so InCountry's per-IP limits
(25 connections, 10 requests/s per connection, burst 5) are the proxy's to keep.
Each upstream gets an :class:`UpstreamQuota`: at most ``max_connections`` requests in
flight, a token-bucket rate, and a bounded queue with a deadline. Excess requests
get 429 with ``Retry-After`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from proxy.config import Quota
from proxy.errors import QueueFullError


class TokenBucket:
    """A token bucket with reservations: ``reserve`` says how long to wait for a slot.

    Pure arithmetic over an injected clock; a reservation that will not be used is
    handed back with ``cancel``.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before it may be used (0 = now)."""
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def cancel(self) -> None:
        """Give back a reservation that will not be used."""
        self._tokens = min(self._burst, self._tokens + 1.0)


@dataclass
class QuotaStats:
    in_flight: int = 0
    queued: int = 0
    admitted: int = 0
    rejected: int = 0
    max_in_flight: int = 0


class UpstreamQuota:
    """At most ``max_connections`` requests in flight to one upstream, at ``rate``."""

    def __init__(self, name: str, quota: Quota, clock: Callable[[], float]) -> None:
        self.name = name
        self._quota = quota
        self._clock = clock
        self._slots = asyncio.Semaphore(quota.max_connections)
        self._bucket = TokenBucket(quota.rate, quota.burst, clock)
        self.stats = QuotaStats()

    def _reject(self, why: str) -> QueueFullError:
        self.stats.rejected += 1
        retry = max(1, math.ceil(min(self._quota.queue_timeout, 1 + self.stats.queued / self._quota.rate)))
        return QueueFullError(
            f"{self.name.upper()}'s REST API is at its quota ({self._quota.max_connections} connections, "
            f"{self._quota.rate:g} requests/s) and {why}; retry after the indicated delay",
            retry_after=retry,
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the upstream's connections for the duration of the block.

        Raises :class:`QueueFullError` (429) when the queue is full or the wait for a
        connection or for the rate would pass ``queue_timeout``.
        """
        q = self._quota
        stats = self.stats
        if self._slots.locked() and stats.queued >= q.queue_size:
            raise self._reject(f"{stats.queued} requests are already waiting")
        deadline = self._clock() + q.queue_timeout
        stats.queued += 1
        try:
            try:
                async with asyncio.timeout(q.queue_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise self._reject(f"no connection became free within {q.queue_timeout:g}s") from None
            wait = self._bucket.reserve()
            if wait > 0:
                if self._clock() + wait > deadline:
                    self._bucket.cancel()
                    self._slots.release()
                    raise self._reject("the request rate would exceed it past the queue deadline")
                try:
                    await asyncio.sleep(wait)
                except BaseException:
                    self._slots.release()
                    raise
        finally:
            stats.queued -= 1
        stats.in_flight += 1
        stats.admitted += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            yield
        finally:
            stats.in_flight -= 1
            self._slots.release()
