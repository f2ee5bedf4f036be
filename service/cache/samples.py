"""Incremental sample store: samples drawn for one (tenant, prompt, model, sampling params without n/seed) are pooled,
so a later request for N=32 reuses the 16 already drawn and only generates 16 more.

Samples are i.i.d. draws from the same distribution, so pooling them across requests does not change what a
best-of-N / voting strategy sees. A request that promises seeded reproducibility should bypass the store.
"""

from __future__ import annotations

import orjson

from .base import Cache


class SampleStore:
    def __init__(self, cache: Cache, max_samples: int = 256) -> None:
        self.cache = cache
        # Bound per key: memory and Redis list length stay finite however often a prompt is asked.
        self.max_samples = max_samples

    async def get_samples(self, key: str, limit: int | None = None) -> list[dict]:
        """Stored samples, oldest first (at most `limit`). Failures and corrupt elements read as fewer samples."""
        out: list[dict] = []
        for body in await self.cache.list_get(key, limit):
            try:
                sample = orjson.loads(body)
            except orjson.JSONDecodeError:
                continue  # envelope was valid, so this is a writer bug; skip rather than fail the request
            if isinstance(sample, dict):
                out.append(sample)
        return out

    async def add_samples(self, key: str, new: list[dict], ttl_s: float | None) -> int:
        """Append `new` atomically; returns the pool size afterwards (0 when the write was dropped)."""
        if not new:
            return 0
        return await self.cache.list_append(key, [orjson.dumps(s) for s in new], ttl_s, self.max_samples)
