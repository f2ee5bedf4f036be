"""Soak: mixed requests (plain, streaming, disconnecting, failing) against one gateway with bounded RSS growth after
warm-up. CI runs a short soak (TTC_SOAK_REQUESTS, default 300); scripts/long-tests.sh runs thousands."""

from __future__ import annotations

import concurrent.futures
import os
import random

import httpx
import pytest

pytestmark = pytest.mark.integration
REQUESTS = int(os.environ.get("TTC_SOAK_REQUESTS", "300"))
MAX_GROWTH_MB = 40


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def one(base: str, model: str, i: int) -> str:
    rng = random.Random(i)
    kind = rng.choice(["plain", "stream", "disconnect", "bad", "unknown_model", "cached"])
    body = {"model": model, "prompt": f"Soak {i % 50}:", "max_tokens": 4, "temperature": 0.7}
    with httpx.Client(base_url=base, timeout=60) as c:
        if kind == "plain":
            assert c.post("/v1/completions", json=body).status_code == 200
        elif kind == "cached":
            assert c.post("/v1/completions", json=dict(body, temperature=0)).status_code == 200
        elif kind == "stream":
            with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                assert r.status_code == 200 and list(r.iter_lines())
        elif kind == "disconnect":
            with c.stream("POST", "/v1/completions", json=dict(body, stream=True, max_tokens=200)) as r:
                next(r.iter_lines())  # leave mid-stream
        elif kind == "bad":
            assert c.post("/v1/completions", json=dict(body, max_tokens=-1)).status_code == 400
        else:
            assert c.post("/v1/completions", json=dict(body, model="nope")).status_code == 404
    return kind


def test_soak_bounded_memory(spawn_gateway, model_name):
    gw = spawn_gateway(TTC_CACHE_MEMORY_MAX_ENTRIES="1000")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: one(gw.base_url, model_name, i), range(100)))  # warm-up
        before = rss_mb(gw.proc.pid)
        kinds = list(pool.map(lambda i: one(gw.base_url, model_name, i), range(100, 100 + REQUESTS)))
    after = rss_mb(gw.proc.pid)
    assert len(set(kinds)) == 6
    assert after - before < MAX_GROWTH_MB, f"RSS grew {after - before:.1f} MB over {REQUESTS} requests"
    assert httpx.get(gw.base_url + "/ready").status_code == 200
