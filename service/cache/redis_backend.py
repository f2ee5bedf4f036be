"""Redis cache on redis.asyncio that fails open: a slow, paused or dead Redis turns into misses, never into errors.

- short socket/connect timeouts plus a hard per-operation deadline (redis-py without socket_timeout hangs);
- no retries (redis-py >= 6 retries 3x by default: a retry storm against a struggling server);
- a circuit breaker so a dead Redis costs nothing per request;
- lazy connections, so the gateway starts while Redis is down; a bounded, blocking connection pool.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import envelope
from .base import EventHook, _Instrumented
from .breaker import OPEN, CircuitBreaker

log = logging.getLogger("ttc.cache")

_FAILED = object()  # the call was attempted and failed
_SKIPPED = object()  # the breaker is open: the call was not attempted
# No CLIENT SETINFO round trips on connect (and no errors from servers older than 7.2); redis-py >= 7.1 spells it
# driver_info=None and deprecates lib_name/lib_version, older versions only know the latter.
_NO_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


class RedisCache(_Instrumented):
    name = "redis"

    def __init__(
        self,
        url: str,
        socket_timeout_s: float = 0.1,
        connect_timeout_s: float = 0.1,
        breaker_failures: int = 5,
        breaker_reset_s: float = 10.0,
        key_prefix: str = "ttc:",
        max_connections: int = 32,
        on_event: EventHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_event)
        self.key_prefix = key_prefix
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s, clock)  # clock: tests skip the wait
        # Hard cap on one operation: pool wait + connect + one read, whatever redis-py does inside.
        self.deadline_s = connect_timeout_s + 2 * socket_timeout_s
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=connect_timeout_s,  # wait for a free pooled connection no longer than for a new one
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            **_NO_SETINFO,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self.breaker.state != OPEN and not self._closed

    def _k(self, key: str) -> str:
        return self.key_prefix + key

    async def _run(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis call behind the breaker and the deadline; return its result, _FAILED or _SKIPPED."""
        if self._closed or not self.breaker.allow():
            return _SKIPPED
        self.stats["calls"] += 1
        try:
            async with asyncio.timeout(self.deadline_s):
                result = await fn()
        except asyncio.CancelledError:
            self.breaker.release_probe()
            raise
        except Exception as exc:  # RedisError, TimeoutError, OSError...: all mean "no answer"
            was_open = self.breaker.state == OPEN
            self.breaker.record_failure()
            if self.breaker.state == OPEN and not was_open:
                log.warning("redis cache: breaker open for %.1fs after %s failed: %r", self.breaker.reset_s, op, exc)
            else:
                log.debug("redis cache: %s failed: %r", op, exc)
            return _FAILED
        self.breaker.record_success()
        return result

    def _outcome(self, keys: list[str], result: Any, write: bool = False) -> bool:
        """Count a failed/skipped call once per key; True when `result` is a real answer."""
        if result is _SKIPPED:
            if not write:  # a skipped write is not a second event for the same request
                for key in keys:
                    self._emit(key, "bypass")
            return False
        if result is _FAILED:
            for key in keys:
                self._emit(key, "error", stat="write_errors" if write else "errors")
            return False
        return True

    async def _delete_corrupt(self, keys: list[str]) -> None:
        if keys:  # best effort: a failure here is just another counted error
            await self._run("del", lambda: self._redis.delete(*(self._k(k) for k in keys)))

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = list(keys)
        if not keys:
            return []
        raws = await self._run("mget", lambda: self._redis.mget([self._k(k) for k in keys]))
        if not self._outcome(keys, raws):
            return [None] * len(keys)
        out: list[bytes | None] = []
        corrupt: list[str] = []
        for key, raw in zip(keys, raws):
            body = envelope.unwrap(raw)
            if raw is None:
                self._emit(key, "miss")
            elif body is None:
                corrupt.append(key)
                self._emit(key, "error", stat="corrupt")
            else:
                self._emit(key, "hit")
            out.append(body)
        await self._delete_corrupt(corrupt)
        return out

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        await self.set_many({key: value}, ttl_s)

    async def set_many(self, items: dict[str, bytes], ttl_s: float | None) -> None:
        if not items:
            return

        async def write() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for key, value in items.items():
                if ttl_s is not None and ttl_s <= 0:
                    pipe.delete(self._k(key))
                elif ttl_s is None:
                    pipe.set(self._k(key), envelope.wrap(value))
                else:
                    pipe.set(self._k(key), envelope.wrap(value), px=max(1, int(ttl_s * 1000)))
            return await pipe.execute()

        self._outcome(list(items), await self._run("set", write), write=True)

    async def list_append(self, key: str, values: list[bytes], ttl_s: float | None, max_len: int) -> int:
        if not values:
            return 0
        k = self._k(key)

        async def append() -> Any:
            # MULTI/EXEC: push, bound and re-arm the TTL as one unit, so concurrent appenders never lose samples.
            pipe = self._redis.pipeline(transaction=True)
            pipe.rpush(k, *(envelope.wrap(v) for v in values))
            pipe.ltrim(k, 0, max_len - 1)
            if ttl_s is not None:
                pipe.pexpire(k, max(1, int(ttl_s * 1000)))
            return await pipe.execute()

        result = await self._run("rpush", append)
        if not self._outcome([key], result, write=True):
            return 0
        return min(int(result[0]), max_len)

    async def list_get(self, key: str, limit: int | None = None) -> list[bytes]:
        if limit is not None and limit <= 0:
            return []
        end = -1 if limit is None else limit - 1
        raws = await self._run("lrange", lambda: self._redis.lrange(self._k(key), 0, end))
        if not self._outcome([key], raws):
            return []
        good: list[bytes] = []
        bad: list[bytes] = []
        for raw in raws:
            body = envelope.unwrap(raw)
            (bad if body is None else good).append(raw if body is None else body)
        if bad:
            self.stats["corrupt"] += len(bad)
            k = self._k(key)

            async def drop() -> Any:
                pipe = self._redis.pipeline(transaction=False)
                for raw in bad:
                    pipe.lrem(k, 0, raw)
                return await pipe.execute()

            await self._run("lrem", drop)
        self._emit(key, "hit" if good else ("error" if bad else "miss"))
        return good

    async def close(self) -> None:
        self._closed = True
        try:
            await self._redis.aclose()
            await self._pool.disconnect()
        except Exception as exc:  # closing a half-dead connection must not fail shutdown
            log.debug("redis cache: close failed: %r", exc)


async def run_script(cache: RedisCache, script: str, keys: list[str], args: list[Any]) -> Any:
    """One atomic server-side script behind the cache's breaker and deadline; None when Redis did not answer."""
    full_keys = [cache.key_prefix + k for k in keys]
    result = await cache._run("eval", lambda: cache._redis.eval(script, len(full_keys), *full_keys, *args))
    return None if result is _FAILED or result is _SKIPPED else result
