"""Admission control: the token bucket's arithmetic and the per-upstream queue."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.config import Quota
from proxy.errors import QueueFullError
from proxy.quota import TokenBucket, UpstreamQuota
from tests.conftest import ManualClock


def test_bucket_allows_burst_then_spaces_at_rate(clock: ManualClock) -> None:
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() == pytest.approx(0.1)
    assert bucket.reserve() == pytest.approx(0.2)
    clock.advance(0.2)  # the two reservations are now due; nothing left over
    assert bucket.reserve() == pytest.approx(0.1)


def test_bucket_refills_up_to_burst_only(clock: ManualClock) -> None:
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    for _ in range(3):
        bucket.reserve()
    clock.advance(100)
    assert [bucket.reserve() for _ in range(3)] == [0.0] * 3
    assert bucket.reserve() > 0


def test_cancelled_reservation_is_given_back(clock: ManualClock) -> None:
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    bucket.reserve()
    wait = bucket.reserve()
    assert wait == pytest.approx(1.0)
    bucket.cancel()
    assert bucket.reserve() == pytest.approx(1.0)


def quota(**kw: float) -> UpstreamQuota:
    q = Quota(**{"rate": 1000.0, "burst": 1000, **kw})  # type: ignore[arg-type]
    return UpstreamQuota("de", q, time.monotonic)


async def test_at_most_max_connections_in_flight() -> None:
    q = quota(max_connections=3, queue_timeout=5)
    release = asyncio.Event()
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with q.slot():
            peak = max(peak, q.stats.in_flight)
            await release.wait()

    tasks = [asyncio.ensure_future(one()) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert q.stats.in_flight == 3 and q.stats.queued == 2
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3 and q.stats.in_flight == 0 and q.stats.admitted == 5


async def test_full_queue_rejects_at_once_with_retry_after() -> None:
    q = quota(max_connections=1, queue_size=1, queue_timeout=5)
    release = asyncio.Event()

    async def hold() -> None:
        async with q.slot():
            await release.wait()

    tasks = [asyncio.ensure_future(hold()) for _ in range(2)]  # one in flight, one queued
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFullError) as err:
        async with q.slot():
            pass
    assert err.value.status == 429 and err.value.retry_after and err.value.retry_after >= 1
    assert "waiting" in err.value.detail
    release.set()
    await asyncio.gather(*tasks)
    assert q.stats.rejected == 1


async def test_queue_deadline_rejects() -> None:
    q = quota(max_connections=1, queue_timeout=0.1)
    release = asyncio.Event()

    async def hold() -> None:
        async with q.slot():
            await release.wait()

    task = asyncio.ensure_future(hold())
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError, match="no connection became free"):
        async with q.slot():
            pass
    release.set()
    await task
    assert q.stats.queued == 0 and q.stats.in_flight == 0


async def test_rate_wait_past_deadline_rejects_and_frees_the_slot() -> None:
    q = UpstreamQuota("de", Quota(max_connections=5, rate=1, burst=1, queue_timeout=0.5), time.monotonic)
    async with q.slot():
        pass
    with pytest.raises(QueueFullError, match="rate"):
        async with q.slot():
            pass
    assert q.stats.in_flight == 0
    # The slot was released: a later request (after the rate allows) gets in.
    await asyncio.sleep(1.0)
    async with q.slot():
        assert q.stats.in_flight == 1


async def test_cancelled_waiter_leaves_counters_clean() -> None:
    q = quota(max_connections=1, queue_timeout=5)
    release = asyncio.Event()

    async def hold() -> None:
        async with q.slot():
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await asyncio.sleep(0.01)

    async def wait() -> None:
        async with q.slot():
            pass

    waiter = asyncio.ensure_future(wait())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    release.set()
    await holder
    assert q.stats.queued == 0 and q.stats.in_flight == 0
    async with q.slot():  # the semaphore was not leaked
        pass
