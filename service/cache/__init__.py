"""Response / reward / sample cache: one interface (`Cache`), a Redis backend and an in-process fallback."""

from __future__ import annotations

from .base import Cache, EventHook
from .breaker import CircuitBreaker
from .envelope import unwrap, wrap
from .keys import (
    SAMPLE_KEY_EXCLUDED,
    CacheDirectives,
    cache_key,
    cacheable_response,
    canonical_json,
    key_kind,
    parse_cache_control,
    samples_key,
)
from .memory import MemoryCache
from .redis_backend import RedisCache
from .samples import SampleStore

__all__ = [
    "SAMPLE_KEY_EXCLUDED",
    "Cache",
    "CacheDirectives",
    "CircuitBreaker",
    "EventHook",
    "MemoryCache",
    "RedisCache",
    "SampleStore",
    "build_cache",
    "cache_key",
    "cacheable_response",
    "canonical_json",
    "key_kind",
    "parse_cache_control",
    "samples_key",
    "unwrap",
    "wrap",
]


def build_cache(
    redis_url: str | None,
    *,
    key_prefix: str = "ttc:",
    socket_timeout_s: float = 0.1,
    connect_timeout_s: float = 0.1,
    breaker_failures: int = 5,
    breaker_reset_s: float = 10.0,
    max_connections: int = 32,
    memory_max_entries: int = 10_000,
    memory_max_bytes: int = 64 * 1024 * 1024,
    on_event: EventHook | None = None,
) -> Cache:
    """Redis when a URL is configured, else an in-process MemoryCache. Never connects here (start with Redis down)."""
    if redis_url:
        return RedisCache(
            redis_url,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
            breaker_failures=breaker_failures,
            breaker_reset_s=breaker_reset_s,
            key_prefix=key_prefix,
            max_connections=max_connections,
            on_event=on_event,
        )
    return MemoryCache(memory_max_entries, memory_max_bytes, on_event=on_event)
