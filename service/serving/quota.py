"""Cumulative FLOPs quotas per API key: reserve the worst case, settle the exact spend, never overspend.

A request reserves its whole budget before it runs (check-and-add in one atomic step: a Lua script on Redis, shared
by all gateway replicas; a lock in-process otherwise) and settles what it really spent when it ends, however it ends.
Settling replaces the reservation by the exact charge, so the counter holds the sum of what requests spent, to the
FLOP (integers throughout: Redis INCRBY, never floats). Each reservation is stored under its own id, so a settle is
applied at most once and can be retried safely when Redis did not answer, and a reservation whose reply was lost can
be cancelled later without guessing whether it happened.

While Redis does not answer: `fail_closed` (the default) refuses requests of keys with a quota (503
`quota_unavailable`); `fail_open` admits them against a local ledger (the key's counter as last seen in Redis plus what
this process charged since) and replays that ledger into Redis once it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from ..cache import Cache, RedisCache
from ..cache.redis_backend import run_script

log = logging.getLogger("ttc.quota")

StoreFailure = Literal["fail_closed", "fail_open"]

# KEYS: counter, reservations hash. ARGV: amount, limit, window ms, reservation id.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, tostring(used), redis.call('PTTL', KEYS[1])} end
local now = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 86400000)
return {1, tostring(now), redis.call('PTTL', KEYS[1])}
"""
# ARGV: reservation id, actual spend. Applies once: the reservation leaves the hash as the charge replaces it.
_SETTLE = """
local reserved = redis.call('HGET', KEYS[2], ARGV[1])
if not reserved then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[2])
  if tonumber(redis.call('DECRBY', KEYS[1], reserved)) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
return 1
"""
# ARGV: ledger entry id, amount, window ms. A charge made while Redis was away, replayed once.
_APPLY = """
if redis.call('HSETNX', KEYS[2], 'applied:' .. ARGV[1], 1) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 86400000)
redis.call('INCRBY', KEYS[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


class QuotaExceeded(Exception):
    def __init__(self, used: int, limit: float, amount: int, retry_after_s: int):
        super().__init__(f"FLOPs quota: {used:.3e} of {limit:.3e} used; {amount:.3e} more does not fit")
        self.used, self.limit, self.amount, self.retry_after_s = used, limit, amount, retry_after_s


class QuotaUnavailable(Exception):
    """The quota store does not answer and the policy is fail_closed."""


@dataclass
class Reservation:
    key: str
    rid: str
    amount: int
    window_s: int
    # Admitted on the local ledger while Redis was away (settled into the ledger, replayed later).
    local: bool = False
    settled: bool = False


def flops_int(flops: float) -> int:
    """The integer FLOPs a request is charged and reports (the meter's sums are integral up to float rounding)."""
    return int(round(flops))


class FlopsQuota:
    def __init__(self, cache: Cache, on_store_failure: StoreFailure = "fail_closed",
                 clock=time.monotonic):
        self.redis = cache if isinstance(cache, RedisCache) else None
        self.on_store_failure = on_store_failure
        self._clock = clock
        self._lock = asyncio.Lock()
        self._local: dict[str, tuple[int, float]] = {}  # no Redis: key -> (used, window end)
        self._local_reservations: dict[str, Reservation] = {}
        # Redis mode, while it is away: counters last seen, charges to replay, settles to retry.
        self._seen: dict[str, int] = {}
        # entry id -> (key, amount, window s, settled): a charge is replayed once it is final.
        self._ledger: dict[str, tuple[str, int, int, bool]] = {}
        self._unsettled: dict[str, tuple[str, int]] = {}  # reservation id -> (key, actual)

    @staticmethod
    def _keys(key: str) -> list[str]:
        # One hash tag: both keys live in the same Redis Cluster slot, as a script's keys must.
        return [f"quota:{{{key}}}", f"quota-reservations:{{{key}}}"]

    def used_locally(self, key: str) -> int:
        """What this process counts against `key` (in-process mode), for tests and logs."""
        return self._local.get(key, (0, 0.0))[0]

    async def reserve(self, key: str, amount: float, limit: float, window_s: int,
                      on_store_failure: StoreFailure | None = None) -> Reservation:
        """Raises QuotaExceeded when `amount` more would pass `limit` in the current window, QuotaUnavailable when
        the store does not answer under fail_closed."""
        res = Reservation(key, uuid.uuid4().hex, max(0, math.ceil(amount)), window_s)
        if self.redis is None:
            async with self._lock:
                now = self._clock()
                used, ends = self._local.get(key, (0, now + window_s))
                if now >= ends:
                    used, ends = 0, now + window_s
                if used + res.amount > limit:
                    raise QuotaExceeded(used, limit, res.amount, max(1, int(ends - now)))
                self._local[key] = (used + res.amount, ends)
                self._local_reservations[res.rid] = res
            return res
        await self._replay()
        reply = await run_script(self.redis, _RESERVE, self._keys(key),
                                 [res.amount, repr(float(limit)), window_s * 1000, res.rid])
        if reply is not None:
            ok, used, ttl_ms = int(reply[0]), int(float(reply[1])), int(reply[2])
            self._seen[key] = used
            if not ok:
                raise QuotaExceeded(used, limit, res.amount, max(1, ttl_ms // 1000))
            return res
        # No answer: the script may or may not have run. Cancel that reservation once Redis answers again.
        self._unsettled[res.rid] = (key, 0)
        if (on_store_failure or self.on_store_failure) == "fail_closed":
            log.warning("quota store unreachable: refusing a request of a key with a quota (fail_closed)")
            raise QuotaUnavailable()
        async with self._lock:
            used = self._seen.get(key, 0) + sum(a for k, a, _, _ in self._ledger.values() if k == key)
            if used + res.amount > limit:
                raise QuotaExceeded(used, limit, res.amount, window_s)
            res.local = True
            self._ledger[res.rid] = (key, res.amount, window_s, False)
        log.warning("quota store unreachable: admitting on the local ledger (fail_open)")
        return res

    async def settle(self, res: Reservation, spent_flops: float) -> None:
        """Replace the reservation by what was really spent (at most once per reservation)."""
        if res.settled:
            return
        res.settled = True
        actual = flops_int(spent_flops)
        if self.redis is None:
            async with self._lock:
                self._local_reservations.pop(res.rid, None)
                if res.key in self._local:
                    used, ends = self._local[res.key]
                    self._local[res.key] = (max(0, used + actual - res.amount), ends)
            return
        if res.local:
            async with self._lock:
                self._ledger[res.rid] = (res.key, actual, res.window_s, True)
            await self._replay()
            return
        await self._replay()
        if await run_script(self.redis, _SETTLE, self._keys(res.key), [res.rid, actual]) is None:
            self._unsettled[res.rid] = (res.key, actual)  # idempotent: safe to retry whether or not it ran

    @property
    def backlog(self) -> int:
        """Charges and settles waiting for Redis to answer again."""
        return len(self._ledger) + len(self._unsettled)

    async def _replay(self) -> None:
        """Apply what piled up while Redis was away, oldest first; stop at the first call it does not answer."""
        if self.redis is None or not (self._ledger or self._unsettled):
            return
        for rid, (key, actual) in list(self._unsettled.items()):
            if await run_script(self.redis, _SETTLE, self._keys(key), [rid, actual]) is None:
                return
            self._unsettled.pop(rid, None)
        for rid, (key, amount, window_s, final) in list(self._ledger.items()):
            if not final:
                continue
            if await run_script(self.redis, _APPLY, self._keys(key), [rid, amount, window_s * 1000]) is None:
                return
            self._ledger.pop(rid, None)
            self._seen[key] = self._seen.get(key, 0) + amount
        log.info("quota store answers again: local ledger replayed")
