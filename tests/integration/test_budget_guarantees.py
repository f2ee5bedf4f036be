"""The README's promises tried as an attacker would, against the running gateway and real vLLM workers: an enforced
budget is never exceeded whatever the input, a key's quota counter equals what was really spent, abandoned streams
settle everything, the quota's Redis-down policy holds, and inputs that once crashed a request get a clear 400."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import re
import signal
import socket
import time
import uuid

import httpx
import pytest
import redis as redis_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RedisServer

pytestmark = pytest.mark.integration

# Code points from every plane, including rare ones that are several tokens each (the old meter counted characters).
PLANES = st.sampled_from([(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
                          (0x1F300, 0x1FAFF), (0x13000, 0x1342F), (0x20000, 0x2A6DF), (0xE0020, 0xE007F),
                          (0xF0000, 0xF00FF)])


@st.composite
def texts(draw, max_len: int = 120) -> str:
    lo, hi = draw(PLANES)
    chars = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=max_len))
    return "".join(map(chr, chars))


def _flops(r: httpx.Response) -> int:
    return int(r.headers["x-ttc-flops"])


def _key_env(quota: float, **policy) -> tuple[str, dict[str, str]]:
    key = f"attack-{uuid.uuid4().hex}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    policies = {digest: {"flops_quota": quota, "quota_window_s": 3600, **policy}}
    return key, {"TTC_API_KEY_HASHES": json.dumps([digest]), "TTC_KEY_POLICIES": json.dumps(policies)}


def test_rare_code_points_and_prompt_lists_cannot_overspend(base_url, model_name):
    """The two measured overspends: 150 hieroglyphs with max_tokens 4 under 3e10, and a list of prompts."""
    r = httpx.post(base_url + "/v1/chat/completions", timeout=120, headers={"X-TTC-Budget-FLOPs": "3e10"},
                   json={"model": model_name, "max_tokens": 4,
                         "messages": [{"role": "user", "content": "\U00013000" * 150}]})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert _flops(r) <= 3e10 and int(r.headers["x-ttc-budget-remaining-flops"]) >= 0
    else:
        assert r.json()["error"]["code"] == "budget_exceeded"
    too_many = httpx.post(base_url + "/v1/completions", timeout=60, headers={"X-TTC-Budget-FLOPs": "3e10"},
                          json={"model": model_name, "prompt": ["Count:"] * 100, "max_tokens": 8})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    batch = httpx.post(base_url + "/v1/completions", timeout=120, headers={"X-TTC-Budget-FLOPs": "3e10"},
                       json={"model": model_name, "prompt": ["Count to ten:"] * 16, "max_tokens": 8, "n": 2})
    assert batch.status_code == 200, batch.text
    assert _flops(batch) <= 3e10
    assert len(batch.json()["choices"]) == 32


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_enforced_budget_is_never_exceeded(base_url, model_name, data):
    """Random prompts (every plane), prompt lists, token-id prompts, n and budgets: X-TTC-FLOPs <= budget, always."""
    budget = data.draw(st.floats(5e9, 3e11))
    n = data.draw(st.integers(1, 4))
    max_tokens = data.draw(st.integers(1, 48))
    route = data.draw(st.sampled_from(["chat", "text", "list", "ids"]))
    body: dict = {"model": model_name, "max_tokens": max_tokens, "n": n, "temperature": 0.8}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": data.draw(texts())}]
        path = "/v1/chat/completions"
    else:
        path = "/v1/completions"
        if route == "text":
            body["prompt"] = data.draw(texts())
        elif route == "list":
            body["prompt"] = data.draw(st.lists(texts(40), min_size=2, max_size=6))
        else:
            body["prompt"] = data.draw(st.lists(st.integers(0, 49151), min_size=1, max_size=300))
    r = httpx.post(base_url + path, json=body, headers={"X-TTC-Budget-FLOPs": repr(budget)}, timeout=180)
    if r.status_code == 400:
        assert r.json()["error"]["code"] in ("budget_exceeded", "invalid_value", "upstream_rejected"), r.text
        return
    assert r.status_code == 200, r.text
    assert _flops(r) <= budget, (route, budget, r.headers["x-ttc-flops"])


@pytest.mark.parametrize("strategy", [{"strategy": "best_of_n", "n": 4}, {"strategy": "beam_search", "n": 4,
                                                                          "beam_width": 2}])
def test_searches_with_rare_code_points_stay_within_budget(base_url, model_name, strategy):
    for budget in (4e10, 1.5e11):
        r = httpx.post(base_url + "/v1/chat/completions", timeout=300, headers={"X-TTC-Budget-FLOPs": repr(budget)},
                       json={"model": model_name, "max_tokens": 48, "ttc": strategy,
                             "messages": [{"role": "user", "content": "\U0001F600\U00013000 What is 2 + 3? " * 4}]})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert _flops(r) <= budget


def test_quota_counter_equals_the_flops_answered(spawn_gateway, private_redis, model_name):
    """16 concurrent requests of random size against a quota: the Redis counter is the sum of the X-TTC-FLOPs of
    the answered requests, to the FLOP, and never more than the quota."""
    quota = 6e11
    key, env = _key_env(quota)
    prefix = f"ttc-q-{uuid.uuid4().hex[:8]}:"
    gw = spawn_gateway(TTC_REDIS_URL=private_redis.url, TTC_CACHE_KEY_PREFIX=prefix, **env)
    rng = random.Random(7)

    def one(i: int) -> httpx.Response:
        prompts = ["Tell me a story about number %d:" % rng.randint(0, 999)] * rng.randint(1, 4)
        body = {"model": model_name, "prompt": prompts, "max_tokens": rng.randint(4, 40), "temperature": 0.9}
        headers = {"Authorization": f"Bearer {key}", "X-TTC-Budget-FLOPs": repr(rng.uniform(3e10, 1.2e11))}
        return httpx.post(gw.base_url + "/v1/completions", json=body, headers=headers, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and 200 in codes, codes
    answered = sum(_flops(r) for r in results if r.status_code == 200)
    digest = hashlib.sha256(key.encode()).hexdigest()
    counter = redis_client.Redis.from_url(private_redis.url).get(f"{prefix}quota:{{{digest}}}")
    assert int(counter) == answered <= quota


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_abandoned_search_streams_settle_quota_metrics_and_admission(spawn_gateway, private_redis, model_name,
                                                                     tmp_path):
    budget = 2e11
    key, env = _key_env(50 * budget)
    prefix = f"ttc-d-{uuid.uuid4().hex[:8]}:"
    gw = spawn_gateway(TTC_REDIS_URL=private_redis.url, TTC_CACHE_KEY_PREFIX=prefix, TTC_MAX_CONCURRENCY="2", **env)
    headers = {"Authorization": f"Bearer {key}", "X-TTC-Budget-FLOPs": repr(budget)}
    body = {"model": model_name, "stream": True, "max_tokens": 96,
            "messages": [{"role": "user", "content": "What is 17 * 23? Explain."}],
            "ttc": {"strategy": "best_of_n", "n": 8}}
    before_gone = _metric(gw.base_url, "ttc_client_disconnects_total")
    before_done = _metric(gw.base_url, "ttc_requests_total")
    for _ in range(6):
        with httpx.stream("POST", gw.base_url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the role chunk; then the client goes away mid-search
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metric(gw.base_url, "ttc_client_disconnects_total") < before_gone + 6:
        time.sleep(0.2)
    assert _metric(gw.base_url, "ttc_client_disconnects_total") == before_gone + 6
    assert _metric(gw.base_url, "ttc_requests_total") == before_done + 6
    digest = hashlib.sha256(key.encode()).hexdigest()
    counter = int(redis_client.Redis.from_url(private_redis.url).get(f"{prefix}quota:{{{digest}}}") or 0)
    assert counter < budget, f"reservations were not settled: {counter:.3e} FLOPs still charged"
    # Both admission slots are free again: two requests run side by side.
    plain = {"model": model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: httpx.post(gw.base_url + "/v1/chat/completions", json=plain,
                                                  headers=headers, timeout=60), range(2)))
    assert [r.status_code for r in done] == [200, 200]
    assert "Task was destroyed but it is pending" not in gw.log_path.read_text(errors="replace")


def test_quota_while_redis_is_down_fails_closed_or_counts_locally(spawn_gateway, model_name):
    """One gateway, two keys over their quota: the default key fails closed while Redis is paused (503), the
    fail-open key is still refused by the local ledger (it remembers the counter it last saw)."""
    server = RedisServer()
    try:
        quota = 3e10  # a request without a budget reserves the whole quota: after one, the next cannot fit
        keys = {mode: f"{mode}-{uuid.uuid4().hex}" for mode in ("fail_closed", "fail_open")}
        digests = {mode: hashlib.sha256(k.encode()).hexdigest() for mode, k in keys.items()}
        policies = {digests["fail_closed"]: {"flops_quota": quota},
                    digests["fail_open"]: {"flops_quota": quota, "quota_on_redis_failure": "fail_open"}}
        gw = spawn_gateway(TTC_REDIS_URL=server.url, TTC_REDIS_BREAKER_FAILURES="1", TTC_REDIS_BREAKER_RESET_S="0.5",
                           TTC_API_KEY_HASHES=json.dumps(list(digests.values())),
                           TTC_KEY_POLICIES=json.dumps(policies))
        body = {"model": model_name, "prompt": "Say hi", "max_tokens": 8}

        def post(mode: str) -> httpx.Response:
            return httpx.post(gw.base_url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {keys[mode]}"})

        for mode in keys:
            assert [post(mode).status_code for _ in range(2)] == [200, 429]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            closed = [post("fail_closed") for _ in range(3)]
            assert {r.status_code for r in closed} == {503}, [r.text for r in closed]
            assert closed[0].json()["error"]["code"] == "quota_unavailable" and "retry-after" in closed[0].headers
            assert [post("fail_open").status_code for _ in range(3)] == [429, 429, 429]
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        time.sleep(0.6)
        assert post("fail_closed").status_code == 429  # Redis answers again: the real counter decides
    finally:
        server.stop()


def test_lone_surrogates_are_a_400_naming_the_field_and_keep_the_connection(base_url, model_name):
    bodies = {
        "messages": '{"model": "%s", "messages": [{"role": "user", "content": "h\\ud800i"}]}',
        "stop": '{"model": "%s", "stop": ["\\udc00"], "messages": [{"role": "user", "content": "hi"}]}',
        "ttc": '{"model": "%s", "ttc": {"strategy": "best_of_n", "x\\ud83d": 1}, '
               '"messages": [{"role": "user", "content": "hi"}]}',
    }
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for field, raw in bodies.items():
            r = client.post("/v1/chat/completions", content=(raw % model_name).encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"].startswith(field), err
            assert "surrogate" in err["message"]
        r = client.post("/v1/completions", content=b'{"model": "%s", "prompt": "\\ud800", "max_tokens": 2}'
                        % model_name.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        ok = client.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200  # the same pooled connection still works


def test_short_deadlines_are_enforced_from_arrival(base_url, model_name):
    start = time.monotonic()
    r = httpx.post(base_url + "/v1/completions", timeout=60, headers={"X-TTC-Deadline-Ms": "50"},
                   json={"model": model_name, "prompt": "Write a long story:", "max_tokens": 400})
    elapsed = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert elapsed < 0.5, f"a 50 ms deadline answered after {elapsed * 1000:.0f} ms"


def test_slowloris_sockets_are_closed_and_headers_bounded(spawn_gateway):
    gw = spawn_gateway(TTC_HEADER_TIMEOUT_S="1", TTC_MAX_HEADER_BYTES="8192")
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    idle = socket.create_connection(("127.0.0.1", gw.port))  # sends nothing at all
    socks.append(idle)
    time.sleep(2.5)
    for s in socks:
        s.settimeout(2)
        assert s.recv(1024) in (b"",) or s.recv(1024) == b"", "the server kept a slow-header socket open"
        s.close()
    big = socket.create_connection(("127.0.0.1", gw.port))
    big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    big.settimeout(5)
    assert big.recv(1024).startswith(b"HTTP/1.1 400")
    big.close()
    assert httpx.get(gw.base_url + "/health").status_code == 200


def test_error_responses_carry_one_request_id_and_probes_reveal_little(remote_gateway, model_name):
    from tests.conftest import API_KEYS

    for path, body in (("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"model": model_name, "prompt": "x", "n": 0}),
                       ("/v1/nothing-here", {})):
        r = httpx.post(remote_gateway.base_url + path, json=body, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEYS[0]}"})
        assert r.status_code in (400, 404)
        assert len(r.headers.get_list("x-request-id")) == 1, r.headers
    anonymous = httpx.get(remote_gateway.base_url + "/ready", timeout=10).json()
    assert set(anonymous) == {"ready", "draining"}
    operator = httpx.get(remote_gateway.base_url + "/ready", timeout=10,
                         headers={"Authorization": f"Bearer {API_KEYS[0]}"}).json()
    assert "pools" in operator and re.search(r"http://127\.0\.0\.1:\d+", json.dumps(operator))


def test_cache_says_bypass_while_the_redis_breaker_is_open(spawn_gateway, model_name):
    gw = spawn_gateway(TTC_REDIS_URL="redis://127.0.0.1:1/0", TTC_REDIS_BREAKER_FAILURES="1",
                       TTC_REDIS_BREAKER_RESET_S="60")
    body = {"model": model_name, "prompt": "2 + 2 =", "max_tokens": 2, "temperature": 0}
    statuses = [httpx.post(gw.base_url + "/v1/completions", json=body, timeout=60).headers["x-ttc-cache"]
                for _ in range(3)]
    assert statuses[1:] == ["bypass", "bypass"], statuses
