"""Reliability guarantees, each against the running service with real vLLM workers (see README "Reliability")."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

LONG = "Write a very long story about a dragon who learns arithmetic."


def running_requests(worker_url: str) -> float:
    text = httpx.get(worker_url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def wait_idle(worker_url: str, within_s: float) -> float:
    """Seconds until the worker runs no request (fails after `within_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if running_requests(worker_url) == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"worker still running requests {within_s} s after the client left")


def wait_running(worker_url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while running_requests(worker_url) == 0:
        assert time.monotonic() < deadline, "the request never reached the worker"
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts_upstream_within_1s(gateway, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": LONG}], "max_tokens": 1500,
            "temperature": 0.9, "stream": True}
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert running_requests(gateway.worker_url) >= 1
    assert wait_idle(gateway.worker_url, 1.0) <= 1.0


def disconnects(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ttc_client_disconnects_total"))


def test_disconnect_mid_search_aborts_upstream_within_1s(gateway, model_name):
    before = disconnects(gateway.base_url)
    body = {"model": model_name, "messages": [{"role": "user", "content": LONG}], "max_tokens": 1000,
            "ttc": {"strategy": "best_of_n", "n": 8, "selection": "majority"}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The client gives up after 3 s (httpx closes the connection), long before the search could finish.
        fut = pool.submit(lambda: httpx.post(gateway.base_url + "/v1/chat/completions", json=body, timeout=3))
        wait_running(gateway.worker_url)
        with pytest.raises(httpx.TimeoutException):
            fut.result()
    # 1 s plus the gateway's 0.25 s disconnect poll.
    assert wait_idle(gateway.worker_url, 1.5) <= 1.5
    assert disconnects(gateway.base_url) == before + 1


def test_stalled_worker_hits_the_deadline_with_504(gateway, model_name):
    body = {"model": model_name, "prompt": "Count to ten:", "max_tokens": 40}
    pid = httpx.get(gateway.base_url + "/ready").json()["pools"]["policy"]["workers"][0]["pid"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = httpx.post(gateway.base_url + "/v1/completions", json=body, headers={"X-TTC-Deadline-Ms": "1500"},
                       timeout=30)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(pid, signal.SIGCONT)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert 1.4 <= elapsed < 3.0
    deadline = time.monotonic() + 60
    while httpx.get(gateway.base_url + "/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert wait_idle(gateway.worker_url, 5.0) < 5.0  # the abandoned request was aborted upstream
    r = httpx.post(gateway.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200


def test_deadline_returns_best_answer_so_far(gateway, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "What is 3 + 4 * 2?"}],
            "max_tokens": 48, "ttc": {"strategy": "beam_search", "n": 4, "beam_width": 2}}
    started = time.monotonic()
    r = httpx.post(gateway.base_url + "/v1/chat/completions", json=body, headers={"X-TTC-Deadline-Ms": "4000"},
                   timeout=60)
    elapsed = time.monotonic() - started
    # Never late. deadline_action "best" answers with what the search has when a round finished in time; on 2 shared
    # cores the first round itself can outlast the deadline, and then the only honest answer is the 504 (measured:
    # both happen here, so the always-200 case is tested on the in-memory worker in tests/unit/test_serving.py).
    assert elapsed < 4.5
    if r.status_code == 504:
        assert r.json()["error"]["code"] == "deadline_exceeded"
    else:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
        assert r.json()["ttc"]["samples"] >= 1


def test_overload_gets_fast_503_and_loses_no_accepted_request(spawn_gateway, model_name):
    gw = spawn_gateway(TTC_MAX_CONCURRENCY="2", TTC_MAX_QUEUE="2", TTC_QUEUE_TIMEOUT_S="120")
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0.8}

    def call(_: int) -> tuple[int, float, dict]:
        t = time.monotonic()
        r = httpx.post(gw.base_url + "/v1/completions", json=body, timeout=120)
        return r.status_code, time.monotonic() - t, dict(r.headers)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(call, range(10)))
    rejected = [x for x in results if x[0] == 503]
    accepted = [x for x in results if x[0] != 503]
    assert rejected, "2x+ overload must shed load"
    assert all(x[0] == 200 for x in accepted), results  # no accepted request is lost
    assert len(accepted) >= 4  # 2 running + 2 queued at least
    assert all(x[1] < 1.0 and int(x[2]["retry-after"]) > 0 for x in rejected)


def test_sigterm_drains_in_flight_requests(spawn_gateway, model_name):
    gw = spawn_gateway(TTC_DRAIN_TIMEOUT_S="60")
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0.8,
            "stop": ["never-appears"]}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.post, gw.base_url + "/v1/completions", json=body, timeout=120) for _ in range(3)]
        time.sleep(1.0)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(gw.base_url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        refused = httpx.post(gw.base_url + "/v1/completions", json=body, timeout=5)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        codes = [f.result().status_code for f in futures]
    assert codes == [200, 200, 200]  # in-flight requests finished
    gw.proc.wait(30)  # and the process exits in time
    assert gw.proc.returncode == 0


def test_budget_caps_per_key_and_budget_too_small(spawn_gateway, model_name):
    import hashlib

    key = "capped-key"
    digest = hashlib.sha256(key.encode()).hexdigest()
    policies = {digest: {"max_budget_flops": 3e11, "strategies": ["best_of_n", "greedy"]}}
    gw = spawn_gateway(TTC_API_KEY_HASHES=json.dumps([digest]), TTC_KEY_POLICIES=json.dumps(policies))
    headers = {"Authorization": f"Bearer {key}"}
    url = gw.base_url + "/v1/chat/completions"
    body = {"model": model_name, "messages": [{"role": "user", "content": "What is 5 + 6?"}], "max_tokens": 32,
            "ttc": {"strategy": "best_of_n", "n": 16}}
    # Asking for more than the key's cap buys only the cap.
    r = httpx.post(url, json=body, headers=dict(headers, **{"X-TTC-Budget-FLOPs": "1e15"}), timeout=120)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-ttc-flops"]) <= 3e11
    assert r.json()["ttc"]["budget"]["flops"] == 3e11
    assert float(r.headers["x-ttc-budget-remaining-flops"]) >= 0
    # A strategy the key may not use.
    r = httpx.post(url, json=dict(body, ttc={"strategy": "rebase"}), headers=headers, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "strategy_not_allowed"
    # Malformed budget header: a 400 naming the header.
    r = httpx.post(url, json=body, headers=dict(headers, **{"X-TTC-Budget-FLOPs": "lots"}), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-TTC-Budget-FLOPs"
    # Too small for even a greedy answer.
    r = httpx.post(url, json=body, headers=dict(headers, **{"X-TTC-Budget-FLOPs": "1e6"}), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "budget_exceeded"


@pytest.mark.parametrize("store", ["redis", "memory"])
def test_concurrent_requests_cannot_overspend_a_key_quota(spawn_gateway, model_name, store):
    """8 concurrent requests against a per-key quota that fits 3 budgets: at most 3 are admitted (atomic in Redis)."""
    import hashlib
    import uuid

    key = f"quota-key-{uuid.uuid4().hex}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    per_request = 2e11
    policies = {digest: {"flops_quota": 3.5 * per_request, "quota_window_s": 600}}
    env = {"TTC_API_KEY_HASHES": json.dumps([digest]), "TTC_KEY_POLICIES": json.dumps(policies)}
    if store == "redis":
        env.update(TTC_REDIS_URL="redis://127.0.0.1:6379/0", TTC_CACHE_KEY_PREFIX=f"ttc-test-{uuid.uuid4().hex}:")
    gw = spawn_gateway(**env)
    headers = {"Authorization": f"Bearer {key}", "X-TTC-Budget-FLOPs": f"{per_request}"}
    body = {"model": model_name, "prompt": "Tell me a story:", "max_tokens": 64, "temperature": 0.8,
            "stop": ["never-appears"]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: httpx.post(gw.base_url + "/v1/completions", json=body, headers=headers,
                                                     timeout=120), range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) <= 3 and codes.count(200) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
