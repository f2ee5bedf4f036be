"""Cumulative FLOPs quotas per API key, enforced atomically so concurrent requests cannot overspend.

A request reserves its whole budget before it runs (check-and-add in one step: a Lua script on Redis, shared by all
gateway replicas; a lock in-process otherwise) and gives back what it did not use when it ends. N concurrent requests
against a quota that fits k budgets admit at most k. If Redis does not answer, the quota fails open (logged): the
cache's rule that a broken dependency degrades the service instead of breaking it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..cache import Cache, RedisCache
from ..cache.redis_backend import run_script

log = logging.getLogger("ttc.quota")

_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, tostring(used), redis.call('PTTL', KEYS[1])} end
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, tostring(used + tonumber(ARGV[1])), redis.call('PTTL', KEYS[1])}
"""
_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return tostring(redis.call('INCRBYFLOAT', KEYS[1], -tonumber(ARGV[1]))) end
return '0'
"""


class QuotaExceeded(Exception):
    def __init__(self, used: float, limit: float, retry_after_s: int):
        super().__init__(f"FLOPs quota spent: {used:.3e} of {limit:.3e}")
        self.used, self.limit, self.retry_after_s = used, limit, retry_after_s


class FlopsQuota:
    def __init__(self, cache: Cache):
        self.redis = cache if isinstance(cache, RedisCache) else None
        self._lock = asyncio.Lock()
        self._local: dict[str, tuple[float, float]] = {}  # key -> (used, window end)

    async def reserve(self, key: str, amount: float, limit: float, window_s: int) -> None:
        """Raises QuotaExceeded when `amount` more would pass `limit` in the current window."""
        if self.redis is not None:
            result = await run_script(self.redis, _RESERVE, [f"quota:{key}"], [repr(amount), repr(limit),
                                                                               window_s * 1000])
            if result is None:
                log.warning("quota store unreachable: admitting without a quota check")
                return
            ok, used, ttl_ms = int(result[0]), float(result[1]), int(result[2])
            if not ok:
                raise QuotaExceeded(used, limit, max(1, ttl_ms // 1000))
            return
        async with self._lock:
            now = time.monotonic()
            used, ends = self._local.get(key, (0.0, now + window_s))
            if now >= ends:
                used, ends = 0.0, now + window_s
            if used + amount > limit:
                raise QuotaExceeded(used, limit, max(1, int(ends - now)))
            self._local[key] = (used + amount, ends)

    async def refund(self, key: str, amount: float) -> None:
        if amount <= 0:
            return
        if self.redis is not None:
            await run_script(self.redis, _REFUND, [f"quota:{key}"], [repr(amount)])
            return
        async with self._lock:
            if key in self._local:
                used, ends = self._local[key]
                self._local[key] = (max(0.0, used - amount), ends)
