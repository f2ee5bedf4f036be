"""The Cache interface both backends implement, and the event/stat plumbing they share.

The cache never imports metrics: it reports through an optional `on_event(kind, result)` callback and plain counters,
so it stays usable from calibrate/bench scripts and unit tests without a Prometheus registry.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterable, Protocol, runtime_checkable

from .keys import key_kind

log = logging.getLogger("ttc.cache")

# on_event(kind, result): kind is the key namespace (response|prm|samples|other); result is
#   hit | miss          -- a read answered by the backend
#   error               -- backend failure or corrupt entry on a read, or a failed write (caller saw a miss / no-op)
#   bypass              -- circuit breaker open: the backend was not called at all
EventHook = Callable[[str, str], None]


@runtime_checkable
class Cache(Protocol):
    name: str

    @property
    def healthy(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None: ...

    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]: ...

    async def set_many(self, items: dict[str, bytes], ttl_s: float | None) -> None: ...

    # Append-only lists (the sample store): atomic append with TTL refresh, bounded length, ordered read.
    async def list_append(self, key: str, values: list[bytes], ttl_s: float | None, max_len: int) -> int: ...

    async def list_get(self, key: str, limit: int | None = None) -> list[bytes]: ...

    async def close(self) -> None: ...


class _Instrumented:
    """Counters every backend keeps (`stats`) plus the optional event callback."""

    def __init__(self, on_event: EventHook | None) -> None:
        self._on_event = on_event
        # hits, misses, errors, corrupt, bypassed, write_errors, calls (backend round trips attempted)
        self.stats: Counter[str] = Counter()

    def _emit(self, key: str, result: str, count: int = 1, stat: str | None = None) -> None:
        self.stats[stat or _STAT_NAME.get(result, result)] += count
        if self._on_event is None:
            return
        kind = key_kind(key)
        try:
            for _ in range(count):
                self._on_event(kind, result)
        except Exception:  # a broken metrics hook must not break caching
            log.exception("cache on_event hook failed")


_STAT_NAME = {"hit": "hits", "miss": "misses", "error": "errors", "bypass": "bypassed"}
