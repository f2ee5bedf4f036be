"""In-process LRU cache with per-entry TTL, bounded by entry count AND bytes (the no-Redis fallback).

Single event loop, no awaits inside a mutation: every operation is atomic with respect to other tasks.
Expiry is lazy (checked on read); expired entries otherwise age out through LRU eviction.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable

from . import envelope
from .base import EventHook, _Instrumented

_Value = bytes | list[bytes]


class _Entry:
    __slots__ = ("value", "expires", "size")

    def __init__(self, value: _Value, expires: float | None, size: int) -> None:
        self.value = value
        self.expires = expires
        self.size = size


class MemoryCache(_Instrumented):
    name = "memory"

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        on_event: EventHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_event)
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("MemoryCache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes_used = 0

    @property
    def healthy(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._data)

    # -- internals: raw stored values (already enveloped) --

    def _lookup(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires is not None and entry.expires <= self._clock():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return entry

    def _remove(self, key: str) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.size

    def _put(self, key: str, value: _Value, ttl_s: float | None) -> None:
        self._remove(key)
        if ttl_s is not None and ttl_s <= 0:
            return  # a zero TTL means "do not keep"; the old value is gone too, as on Redis
        size = len(key) + (len(value) if isinstance(value, bytes) else sum(map(len, value)))
        if size > self.max_bytes:
            self.stats["too_large"] += 1
            return
        expires = None if ttl_s is None else self._clock() + ttl_s
        self._data[key] = _Entry(value, expires, size)
        self.bytes_used += size
        while len(self._data) > self.max_entries or self.bytes_used > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self.bytes_used -= old.size
            self.stats["evictions"] += 1

    # -- Cache interface --

    async def get(self, key: str) -> bytes | None:
        entry = self._lookup(key)
        if entry is None or not isinstance(entry.value, bytes):
            self._emit(key, "miss")
            return None
        body = envelope.unwrap(entry.value)
        if body is None:
            self._remove(key)
            self._emit(key, "error", stat="corrupt")
            return None
        self._emit(key, "hit")
        return body

    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        self._put(key, envelope.wrap(value), ttl_s)

    async def set_many(self, items: dict[str, bytes], ttl_s: float | None) -> None:
        for k, v in items.items():
            self._put(k, envelope.wrap(v), ttl_s)

    async def list_append(self, key: str, values: list[bytes], ttl_s: float | None, max_len: int) -> int:
        entry = self._lookup(key)
        old = entry.value if entry is not None and isinstance(entry.value, list) else []
        merged = (old + [envelope.wrap(v) for v in values])[:max_len]  # keep the oldest, like LTRIM 0 max_len-1
        self._put(key, merged, ttl_s)
        return len(merged) if key in self._data else 0

    async def list_get(self, key: str, limit: int | None = None) -> list[bytes]:
        entry = self._lookup(key)
        if entry is None or not isinstance(entry.value, list):
            self._emit(key, "miss")
            return []
        raw = entry.value if limit is None else entry.value[:limit]
        bodies = [envelope.unwrap(r) for r in raw]
        good = [b for b in bodies if b is not None]
        bad = len(bodies) - len(good)
        if bad:
            # Drop corrupt elements in place so the next reader does not pay for them again.
            kept = [r for r in entry.value if envelope.unwrap(r) is not None]
            self.bytes_used -= entry.size - (len(key) + sum(map(len, kept)))
            entry.value, entry.size = kept, len(key) + sum(map(len, kept))
            self.stats["corrupt"] += bad
        self._emit(key, "hit" if good else ("error" if bad else "miss"))
        return good

    async def close(self) -> None:
        self._data.clear()
        self.bytes_used = 0
