"""The FLOPs quota's promises, on the in-process ledger and on a private real redis-server: concurrent reservations
never pass the limit, settling charges exactly what was spent (to the FLOP), settles apply once, and while Redis is
away the quota fails closed (default) or counts on a local ledger that is replayed when Redis answers again."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import redis

from service.cache import RedisCache, build_cache
from service.serving.quota import FlopsQuota, QuotaExceeded, QuotaUnavailable, flops_int
from tests.conftest import RedisServer

LIMIT = 5e12


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _quota(url: str | None, clock=time.monotonic, **kw) -> FlopsQuota:
    if url:
        # Tests that wait for the breaker pass a FakeClock: its reset time then passes without waiting.
        cache = RedisCache(url, key_prefix="qt:", socket_timeout_s=0.1, connect_timeout_s=0.1, breaker_failures=1,
                           breaker_reset_s=0.2, clock=clock)
    else:
        cache = build_cache(url, key_prefix="qt:")
    return FlopsQuota(cache, **kw)


def _reset_breaker(quota: FlopsQuota) -> None:
    quota.redis.breaker._clock.advance(0.25)


def _counter(server: RedisServer, key: str) -> int:
    raw = redis.Redis.from_url(server.url).get(f"qt:quota:{{{key}}}")
    return int(raw or 0)


async def _random_requests(quota: FlopsQuota, key: str, seed: int) -> tuple[int, int, int]:
    """32 concurrent requests of random budgets; each spends a random part of its reservation (fractional FLOPs
    too). Returns (admitted, refused, sum of charges)."""
    rng = random.Random(seed)
    charges: list[int] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        budget = rng.uniform(1e11, 6e11)
        spent = rng.uniform(0, budget) + 0.4
        try:
            res = await quota.reserve(key, budget, LIMIT, 3600)
        except QuotaExceeded:
            refused += 1
            return
        await asyncio.sleep(rng.uniform(0, 0.01))
        await quota.settle(res, spent)
        await quota.settle(res, spent)  # a second settle is a no-op
        charges.append(flops_int(spent))

    await asyncio.gather(*(one() for _ in range(32)))
    return len(charges), refused, sum(charges)


async def test_memory_ledger_charges_exactly_what_was_spent():
    quota = _quota(None)
    admitted, refused, charged = await _random_requests(quota, "k1", 1)
    assert admitted + refused == 32 and admitted > 0
    assert quota.used_locally("k1") == charged


async def test_memory_ledger_never_admits_past_the_limit():
    quota = _quota(None)
    await quota.reserve("k", 4e12, LIMIT, 3600)
    with pytest.raises(QuotaExceeded) as exc:
        await quota.reserve("k", 2e12, LIMIT, 3600)
    assert exc.value.used == 4_000_000_000_000 and exc.value.amount == 2_000_000_000_000


async def test_redis_counter_equals_the_sum_of_charges(redis_server):
    quota = _quota(redis_server.url)
    admitted, refused, charged = await _random_requests(quota, "k2", 2)
    assert refused > 0, "the test must push the quota to its limit"
    assert _counter(redis_server, "k2") == charged


async def test_redis_reservations_are_atomic_across_gateways(redis_server):
    """Two gateway processes share the counter: together they admit no more than the limit."""
    a, b = _quota(redis_server.url), _quota(redis_server.url)
    results = await asyncio.gather(*(q.reserve("k3", 1e12, LIMIT, 3600) for q in (a, b) * 6),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 5
    assert _counter(redis_server, "k3") == 5 * 10**12


def _pause(server: RedisServer):
    os.kill(server.proc.pid, signal.SIGSTOP)


def _resume(server: RedisServer):
    os.kill(server.proc.pid, signal.SIGCONT)


async def test_redis_down_fails_closed_by_default(redis_server):
    quota = _quota(redis_server.url, FakeClock())
    _pause(redis_server)
    try:
        with pytest.raises(QuotaUnavailable):
            await quota.reserve("k4", 1e11, LIMIT, 3600)
    finally:
        _resume(redis_server)
    _reset_breaker(quota)  # breaker half-opens
    res = await quota.reserve("k4", 1e11, LIMIT, 3600)  # the lost reservation is cancelled first
    await quota.settle(res, 3e10)
    assert _counter(redis_server, "k4") == 3 * 10**10 and quota.backlog == 0


async def test_redis_down_fail_open_counts_locally_and_replays(redis_server):
    quota = _quota(redis_server.url, FakeClock(), on_store_failure="fail_open")
    first = await quota.reserve("k5", 3e12, LIMIT, 3600)
    await quota.settle(first, 2.5e12)  # the counter reads 2.5e12, and the quota has seen it
    _pause(redis_server)
    try:
        local = await quota.reserve("k5", 2e12, LIMIT, 3600)  # 2.5e12 + 2e12 fits the local view
        with pytest.raises(QuotaExceeded):
            await quota.reserve("k5", 1e12, LIMIT, 3600)  # 2.5 + 2 + 1 > 5: refused without Redis
        await quota.settle(local, 1.5e12)
        assert quota.backlog >= 1
    finally:
        _resume(redis_server)
    _reset_breaker(quota)
    last = await quota.reserve("k5", 1e11, LIMIT, 3600)  # Redis answers: the ledger is replayed first
    await quota.settle(last, 1e11)
    assert quota.backlog == 0
    assert _counter(redis_server, "k5") == 2_500_000_000_000 + 1_500_000_000_000 + 100_000_000_000
