"""Cache behaviour, the same tests over both backends (memory, and the real Redis at 127.0.0.1:6379), plus the
fail-open properties only Redis has: unreachable, breaker, paused server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio
import redis

from service.cache import (
    CacheDirectives,
    CircuitBreaker,
    MemoryCache,
    RedisCache,
    SampleStore,
    build_cache,
    cache_key,
    cacheable_response,
    parse_cache_control,
    samples_key,
    wrap,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_URL = "redis://127.0.0.1:1/0"  # closed port: connection refused
RUN_PREFIX = f"ttctest:{uuid.uuid4().hex[:8]}:"


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


REDIS_UP = _redis_up()
needs_redis = pytest.mark.skipif(not REDIS_UP, reason="no Redis server at 127.0.0.1:6379")


@pytest.fixture
def raw_redis():
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    for k in client.scan_iter(match=RUN_PREFIX + "*", count=1000):
        client.delete(k)
    client.close()


# Function loop scope: the redis.asyncio pool must live on the same loop as the (function-scoped) test using it.
@pytest_asyncio.fixture(loop_scope="function", params=["memory", pytest.param("redis", marks=needs_redis)])
async def cache(request):
    events: list[tuple[str, str]] = []

    def record(kind: str, result: str) -> None:
        events.append((kind, result))

    if request.param == "memory":
        clock = FakeClock()
        c = MemoryCache(max_entries=1000, max_bytes=1 << 20, on_event=record, clock=clock)
        c.advance = clock.advance  # time passes without waiting
    else:
        raw = request.getfixturevalue("raw_redis")
        prefix = f"{RUN_PREFIX}{uuid.uuid4().hex[:6]}:"
        # Generous timeouts here: these tests check semantics, not latency, on a shared 2-core box.
        c = RedisCache(REDIS_URL, socket_timeout_s=1.0, connect_timeout_s=1.0, key_prefix=prefix, on_event=record)
        c.raw = raw
        c.advance = asyncio.sleep  # Redis expires keys on its own clock: only waiting shows it
    c.events = events
    yield c
    await c.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


def put_raw(c, key: str, raw) -> None:
    """Write bytes (or a list for list keys) behind the envelope's back, as a buggy writer or bit rot would."""
    if isinstance(c, MemoryCache):
        c._put(key, raw, None)
    elif isinstance(raw, list):
        c.raw.rpush(c.key_prefix + key, *raw)
    else:
        c.raw.set(c.key_prefix + key, raw)


def raw_exists(c, key: str) -> bool:
    return key in c._data if isinstance(c, MemoryCache) else bool(c.raw.exists(c.key_prefix + key))


PAYLOAD = {"model": "smollm2@rev1", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0, "n": 1}


# -- keys and policy (backend independent) --


def test_key_canonicalisation():
    a = cache_key("response", "t1", {"temperature": 1, "top_p": 0.5, "messages": [{"role": "user", "content": "x"}]})
    b = cache_key("response", "t1", {"messages": ({"content": "x", "role": "user"},), "top_p": 0.5, "temperature": 1.0})
    assert a == b and a.startswith("response:") and len(a) == len("response:") + 64
    assert cache_key("response", "t1", {"temperature": -0.0}) == cache_key("response", "t1", {"temperature": 0})
    # Values that merely print alike must not collide.
    assert cache_key("response", "t1", {"x": True}) != cache_key("response", "t1", {"x": 1})
    assert cache_key("response", "t1", {"x": "1"}) != cache_key("response", "t1", {"x": 1})
    assert cache_key("response", "t1", {"temperature": 0.7}) != cache_key("response", "t1", {"temperature": 0.70001})
    assert cache_key("response", "t1", {"seed": None}) != cache_key("response", "t1", {})
    # Namespace and tenant are part of the hash.
    assert cache_key("prm", "t1", PAYLOAD) != cache_key("response", "t1", PAYLOAD)[len("response:") :]
    assert cache_key("response", "t1", PAYLOAD) != cache_key("response", "t2", PAYLOAD)
    with pytest.raises(ValueError):
        cache_key("Bad:ns", "t1", PAYLOAD)
    with pytest.raises(TypeError):
        cache_key("response", "t1", {"x": object()})


def test_samples_key_ignores_n_and_seed():
    base = {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0.8}
    k16 = samples_key("t", {**base, "n": 16, "seed": 1, "stream": True})
    assert k16 == samples_key("t", {**base, "n": 32}) != samples_key("t", {**base, "n": 32, "temperature": 0.9})
    assert k16 != samples_key("other-tenant", {**base, "n": 16})


def test_cacheable_response_policy():
    assert cacheable_response(1, 0.0, None)
    assert cacheable_response(1, 0.8, 42)
    assert not cacheable_response(1, 0.8, None)
    assert not cacheable_response(2, 0.0, 1)


def test_parse_cache_control():
    assert parse_cache_control(None) == CacheDirectives(False, False)
    assert parse_cache_control("no-cache") == CacheDirectives(True, False)
    assert parse_cache_control("No-Store, private") == CacheDirectives(False, True)
    assert parse_cache_control(' max-age="0" , no-store') == CacheDirectives(True, True)
    assert parse_cache_control("max-age=60") == CacheDirectives(False, False)


async def test_build_cache_picks_backend():
    mem = build_cache(None)
    assert mem.name == "memory" and mem.healthy
    # Redis down at construction must not fail start-up: nothing connects until the first call.
    red = build_cache(DEAD_URL)
    assert red.name == "redis" and red.healthy
    await red.close()


# -- both backends --


async def test_hit_miss_and_events(cache):
    k = cache_key("response", "t1", PAYLOAD)
    assert await cache.get(k) is None
    await cache.set(k, b'{"id":"chatcmpl-1"}', ttl_s=30)
    assert await cache.get(k) == b'{"id":"chatcmpl-1"}'
    other = cache_key("prm", "t1", PAYLOAD)
    await cache.set_many({other: b"0.9"}, ttl_s=30)
    assert await cache.get_many([k, other, cache_key("prm", "t1", {})]) == [b'{"id":"chatcmpl-1"}', b"0.9", None]
    assert cache.events == [("response", "miss"), ("response", "hit"), ("response", "hit"), ("prm", "hit"),
                            ("prm", "miss")]  # fmt: skip
    assert cache.stats["hits"] == 3 and cache.stats["misses"] == 2
    assert cache.healthy


async def test_ttl_expiry(cache):
    k, forever, gone = (cache_key("response", "t", {"i": i}) for i in range(3))
    await cache.set(k, b"v", ttl_s=0.4)
    await cache.set(forever, b"f", ttl_s=None)
    await cache.set(gone, b"g", ttl_s=30)
    await cache.set(gone, b"g", ttl_s=0)  # zero TTL = do not keep (and drop the old value)
    assert await cache.get(k) == b"v"
    assert await cache.get(gone) is None
    await cache.advance(0.6)
    assert await cache.get(k) is None
    assert await cache.get(forever) == b"f"


async def test_tenant_isolation(cache):
    mine, theirs = cache_key("response", "tenant-a", PAYLOAD), cache_key("response", "tenant-b", PAYLOAD)
    assert mine != theirs
    await cache.set(mine, b"secret", ttl_s=30)
    assert await cache.get(theirs) is None
    assert await cache.get(mine) == b"secret"


async def test_equal_requests_share_entry(cache):
    await cache.set(cache_key("response", "t", {"temperature": 0, "top_p": 1.0, "seed": 7}), b"r", ttl_s=30)
    assert await cache.get(cache_key("response", "t", {"seed": 7.0, "top_p": 1, "temperature": 0.0})) == b"r"


@pytest.mark.parametrize("garbage", [b"not an envelope", b"", b"TC\x01\x00\x00\x00\x00\x00payload", "flipped"])
async def test_corrupt_entry_is_miss_and_deleted(cache, garbage):
    k = cache_key("response", "t", PAYLOAD)
    if garbage == "flipped":  # a valid envelope with one bit flipped in the body
        good = bytearray(wrap(b'{"answer": 4}'))
        good[-2] ^= 0x01
        garbage = bytes(good)
    put_raw(cache, k, garbage)
    assert await cache.get(k) is None
    assert cache.events[-1] == ("response", "error") and cache.stats["corrupt"] == 1
    assert not raw_exists(cache, k)  # deleted, so the next request writes a good entry
    await cache.set(k, b"fresh", ttl_s=30)
    assert await cache.get(k) == b"fresh"


async def test_sample_store_incremental_reuse(cache):
    store = SampleStore(cache)
    key = samples_key("t", {**PAYLOAD, "temperature": 0.8, "n": 16})
    assert await store.get_samples(key) == []
    assert await store.add_samples(key, [{"i": i, "text": f"s{i}"} for i in range(16)], ttl_s=60) == 16
    first = await store.get_samples(key)
    assert [s["i"] for s in first] == list(range(16))
    # A later N=32 request: reuse 16, draw only the missing 16.
    want = 32
    have = await store.get_samples(samples_key("t", {**PAYLOAD, "temperature": 0.8, "n": want}), limit=want)
    assert len(have) == 16
    assert await store.add_samples(key, [{"i": i} for i in range(16, want)], ttl_s=60) == want
    assert [s["i"] for s in await store.get_samples(key, limit=want)] == list(range(want))
    assert len(await store.get_samples(key, limit=5)) == 5


async def test_sample_store_concurrent_adds_lose_nothing(cache):
    store = SampleStore(cache, max_samples=1000)
    key = samples_key("t", {"prompt": "concurrent"})

    async def writer(w: int) -> None:
        for r in range(5):
            await store.add_samples(key, [{"w": w, "r": r, "j": j} for j in range(4)], ttl_s=60)
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(w) for w in range(8)))
    got = await store.get_samples(key)
    assert len(got) == 8 * 5 * 4
    assert {(s["w"], s["r"], s["j"]) for s in got} == {(w, r, j) for w in range(8) for r in range(5) for j in range(4)}


async def test_sample_store_bounded_and_expires(cache):
    store = SampleStore(cache, max_samples=10)
    key = samples_key("t", {"prompt": "bounded"})
    await store.add_samples(key, [{"i": i} for i in range(8)], ttl_s=0.4)
    assert await store.add_samples(key, [{"i": i} for i in range(8, 16)], ttl_s=0.4) == 10
    assert [s["i"] for s in await store.get_samples(key)] == list(range(10))  # oldest kept
    await cache.advance(0.6)
    assert await store.get_samples(key) == []


async def test_sample_store_skips_corrupt_elements(cache):
    store = SampleStore(cache)
    key = samples_key("t", {"prompt": "corrupt"})
    put_raw(cache, key, [wrap(b'{"i": 0}'), b"junk", wrap(b'{"i": 2}')])
    assert await store.get_samples(key) == [{"i": 0}, {"i": 2}]
    assert cache.stats["corrupt"] == 1
    assert await store.get_samples(key) == [{"i": 0}, {"i": 2}] and cache.stats["corrupt"] == 1  # junk removed


async def test_broken_event_hook_does_not_break_cache(cache):
    def boom(kind: str, result: str) -> None:
        raise RuntimeError("metrics down")

    cache._on_event = boom
    k = cache_key("response", "t", PAYLOAD)
    await cache.set(k, b"v", ttl_s=30)
    assert await cache.get(k) == b"v"


# -- memory only --


async def test_memory_bounded_by_entries_and_bytes():
    c = MemoryCache(max_entries=3, max_bytes=10_000)
    for i in range(5):
        await c.set(f"response:{i}", b"x", ttl_s=None)
    assert len(c) == 3 and await c.get("response:0") is None and await c.get("response:4") == b"x"
    await c.get("response:2")  # touch: now most recently used
    await c.set("response:5", b"x", ttl_s=None)
    assert await c.get("response:2") == b"x" and await c.get("response:3") is None

    c = MemoryCache(max_entries=1000, max_bytes=1000)
    for i in range(20):
        await c.set(f"response:{i}", b"y" * 100, ttl_s=None)
    assert c.bytes_used <= 1000 and 5 <= len(c) < 10
    await c.set("response:huge", b"z" * 5000, ttl_s=None)  # larger than the whole cache: not stored
    assert await c.get("response:huge") is None and c.bytes_used <= 1000


# -- Redis fail-open --


@pytest.mark.parametrize("url", [DEAD_URL, "redis://10.255.255.1:6379/0"], ids=["refused", "blackhole"])
async def test_redis_unreachable_is_fast_miss(url):
    events = []
    c = RedisCache(url, breaker_failures=1000, key_prefix=RUN_PREFIX, on_event=lambda k, r: events.append(r))
    assert c._pool.connection_kwargs["retry"].get_retries() == 0  # no retry storms
    k = cache_key("response", "t", PAYLOAD)
    t0 = time.perf_counter()
    assert await c.get(k) is None
    assert time.perf_counter() - t0 < 0.5
    await c.set(k, b"v", ttl_s=30)  # must not raise
    await c.set_many({k: b"v"}, ttl_s=30)
    assert await c.get_many([k, k]) == [None, None]
    assert await SampleStore(c).add_samples(k, [{"a": 1}], ttl_s=30) == 0
    assert await SampleStore(c).get_samples(k) == []
    assert time.perf_counter() - t0 < 2.0
    assert c.stats["errors"] == 4 and c.stats["write_errors"] == 3
    assert events.count("error") == 7 and "hit" not in events
    await c.close()


async def test_breaker_opens_after_k_failures_and_half_opens():
    events = []
    clock = FakeClock()
    c = RedisCache(DEAD_URL, breaker_failures=3, breaker_reset_s=0.3, on_event=lambda k, r: events.append(r),
                   clock=clock)
    k = cache_key("response", "t", PAYLOAD)
    for _ in range(10):
        assert await c.get(k) is None
    assert c.stats["calls"] == 3 and c.stats["bypassed"] == 7
    assert events == ["error"] * 3 + ["bypass"] * 7
    assert not c.healthy
    await c.set(k, b"v", ttl_s=30)  # skipped without a call
    assert c.stats["calls"] == 3
    await clock.advance(0.35)
    # Half-open: of many concurrent callers exactly one probes Redis; it fails, so the breaker re-opens.
    await asyncio.gather(*(c.get(k) for _ in range(5)))
    assert c.stats["calls"] == 4 and not c.healthy
    await c.close()


def test_circuit_breaker_state_machine():
    now = [0.0]
    b = CircuitBreaker(failures=2, reset_s=5.0, clock=lambda: now[0])
    assert b.allow()
    b.record_failure()
    b.record_success()  # a success resets the consecutive count
    b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 5.0
    assert b.allow() and not b.allow()  # one probe at a time
    b.release_probe()  # probe cancelled: the next caller may probe
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.opened_count == 1


@needs_redis
async def test_redis_paused_fails_open_then_recovers(raw_redis):
    socket_timeout = 0.1
    c = RedisCache(REDIS_URL, socket_timeout_s=socket_timeout, connect_timeout_s=0.1, breaker_failures=2,
                   breaker_reset_s=0.3, key_prefix=f"{RUN_PREFIX}pause:")  # fmt: skip
    k = cache_key("response", "t", PAYLOAD)
    await c.set(k, b"v", ttl_s=30)
    assert await c.get(k) == b"v"  # a warm pooled connection
    pause_ms = 1000
    raw_redis.execute_command("CLIENT", "PAUSE", str(pause_ms), "ALL")  # = redis-cli CLIENT PAUSE 1000 ALL
    paused_at = time.perf_counter()
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            assert await c.get(k) is None
            assert time.perf_counter() - t0 < socket_timeout + 0.25
        assert not c.healthy  # two failures opened the breaker
        t0 = time.perf_counter()
        assert await c.get(k) is None and time.perf_counter() - t0 < 0.01  # bypassed, no network
        await c.set(k, b"w", ttl_s=30)  # dropped, does not raise
        assert time.perf_counter() - paused_at < pause_ms / 1000  # all of the above happened during the pause
    finally:
        await asyncio.sleep(max(0.0, pause_ms / 1000 + 0.05 - (time.perf_counter() - paused_at)))
    await asyncio.sleep(0.3)  # a real pause: the connections must also recover, not only the breaker
    assert await c.get(k) == b"v"  # half-open probe succeeds: closed again
    assert c.healthy and c.stats["bypassed"] >= 1
    await c.close()
