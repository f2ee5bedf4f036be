"""Response caching and Prometheus metrics through the running gateway (in-memory cache and real Redis)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import API_KEYS

pytestmark = pytest.mark.integration


def scrape(base_url: str, headers: dict | None = None) -> dict[tuple, float]:
    text = httpx.get(base_url + "/metrics", headers=headers).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def total(values: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, lv) in ls for k, lv in labels.items()))


def deterministic(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}


def test_metrics_move_with_requests(base_url, model_name):
    before = scrape(base_url)
    r = httpx.post(base_url + "/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 3,
                                                       "temperature": 0.5}, timeout=60)
    assert r.status_code == 200
    httpx.post(base_url + "/v1/completions", json={"model": "nope", "prompt": "Hi"}, timeout=60)
    after = scrape(base_url)
    assert total(after, "ttc_requests_total", status_class="2xx") == total(before, "ttc_requests_total",
                                                                           status_class="2xx") + 1
    assert total(after, "ttc_requests_total", status_class="4xx") >= total(before, "ttc_requests_total",
                                                                           status_class="4xx") + 1
    flops = float(r.headers["x-ttc-flops"])
    assert total(after, "ttc_flops_total", role="policy") - total(before, "ttc_flops_total", role="policy") \
        == pytest.approx(flops, rel=1e-6)
    assert total(after, "ttc_tokens_total", type="completion") > total(before, "ttc_tokens_total", type="completion")
    assert total(after, "ttc_request_duration_seconds_count") > total(before, "ttc_request_duration_seconds_count")
    assert total(after, "ttc_upstream_requests_total", pool="policy", outcome="ok") > 0
    assert total(after, "ttc_workers_ready", pool="policy") >= 1


def test_response_cache_hit_costs_no_flops(base_url, model_name):
    body = deterministic(model_name, "Memory cache probe: 7 + 8 =")
    first = httpx.post(base_url + "/v1/completions", json=body, timeout=60)
    second = httpx.post(base_url + "/v1/completions", json=body, timeout=60)
    assert first.headers["x-ttc-cache"] == "miss" and second.headers["x-ttc-cache"] == "hit"
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert float(first.headers["x-ttc-flops"]) > 0 and float(second.headers["x-ttc-flops"]) == 0
    assert second.json()["ttc"]["cache"] == "hit"
    no_cache = httpx.post(base_url + "/v1/completions", json=body, headers={"Cache-Control": "no-cache"}, timeout=60)
    assert no_cache.headers["x-ttc-cache"] == "bypass" and float(no_cache.headers["x-ttc-flops"]) > 0


def test_sampling_without_seed_is_not_cached(base_url, model_name):
    body = {"model": model_name, "prompt": "Sampled:", "max_tokens": 4, "temperature": 0.9}
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=60)
    assert r.headers["x-ttc-cache"] == "bypass"


def test_cached_stream_replays_as_stream(client, model_name):
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, seed=77,
              temperature=0.8, stream=True, stream_options={"include_usage": True})
    first = list(client.chat.completions.create(**kw))
    second = list(client.chat.completions.create(**kw))
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(first) == text(second) and text(first)
    assert second[-1].usage.model_extra["flops"] == 0
    assert second[-1].model_extra["ttc"]["cache"] == "hit"


def test_auth_required_when_keys_configured(remote_gateway, model_name):
    r = httpx.post(remote_gateway.base_url + "/v1/completions", json=deterministic(model_name, "x"), timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(remote_gateway.base_url + "/v1/completions", json=deterministic(model_name, "x"),
                   headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    assert httpx.get(remote_gateway.base_url + "/metrics").status_code == 401
    assert httpx.get(remote_gateway.base_url + "/health").status_code == 200


def test_redis_cache_is_per_tenant(remote_gateway, private_redis, model_name):
    import redis

    url = remote_gateway.base_url + "/v1/completions"
    body = deterministic(model_name, "Redis tenant probe: 3 * 4 =")
    a = {"Authorization": f"Bearer {API_KEYS[0]}"}
    b = {"Authorization": f"Bearer {API_KEYS[1]}"}
    assert httpx.post(url, json=body, headers=a, timeout=60).headers["x-ttc-cache"] == "miss"
    assert httpx.post(url, json=body, headers=a, timeout=60).headers["x-ttc-cache"] == "hit"
    assert httpx.post(url, json=body, headers=b, timeout=60).headers["x-ttc-cache"] == "miss"
    keys = redis.Redis.from_url(private_redis.url).keys("ttc:response:*")
    assert len(keys) == 2, keys  # one entry per tenant, really in Redis
    metrics = scrape(remote_gateway.base_url, a)
    assert total(metrics, "ttc_cache_requests_total", kind="response", result="hit") >= 1


def test_redis_stopped_requests_still_succeed(remote_gateway, private_redis, model_name):
    """Runs last in this module: it stops the private Redis under the gateway."""
    url = remote_gateway.base_url + "/v1/completions"
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    private_redis.stop()
    for i in range(3):
        r = httpx.post(url, json=deterministic(model_name, f"Redis down probe {i}:"), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] is not None


def generation_tokens(worker_url: str) -> float:
    text = httpx.get(worker_url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


def test_best_of_n_reuses_samples_incrementally(gateway, model_name):
    import uuid

    question = f"Sample reuse probe {uuid.uuid4().hex[:8]}: what is 6 + 7?"
    body = {"model": model_name, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0.8, "ttc": {"strategy": "best_of_n", "n": 4, "selection": "majority"}}
    url = gateway.base_url + "/v1/chat/completions"
    before = generation_tokens(gateway.worker_url)
    first = httpx.post(url, json=body, timeout=300).json()["ttc"]
    mid = generation_tokens(gateway.worker_url)
    second = httpx.post(url, json=dict(body, ttc=dict(body["ttc"], n=8)), timeout=300).json()["ttc"]
    after = generation_tokens(gateway.worker_url)
    assert first["samples_reused"] == 0 and second["samples_reused"] == 4
    assert first["samples"] == 4 and second["samples"] == 8
    # The worker generated only the 4 missing samples, and the meter counted exactly what the worker generated.
    assert mid - before == first["tokens"]["policy_completion"]
    assert after - mid == second["tokens"]["policy_completion"]
    assert second["tokens"]["policy_completion"] <= 4 * 24
    third = httpx.post(url, json=body, headers={"Cache-Control": "no-cache"}, timeout=300).json()["ttc"]
    assert third["samples_reused"] == 0


def test_counters_sum_across_gateway_processes(spawn_gateway, model_name, tmp_path):
    """Three uvicorn worker processes behind one port: /metrics (served by any of them) counts every request once."""
    mp = tmp_path / "metrics"
    mp.mkdir()
    (mp / "counter_999999.db").write_bytes(b"stale")  # left by an earlier run: wiped at start-up
    gw = spawn_gateway(TTC_WORKERS="3", PROMETHEUS_MULTIPROC_DIR=str(mp))
    for i in range(12):
        r = httpx.post(gw.base_url + "/v1/completions", json={"model": model_name, "prompt": f"hi {i}",
                                                               "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    pids = {httpx.get(gw.base_url + "/ready").json()["pid"] for _ in range(30)}
    assert len(pids) >= 2, "requests should spread over several processes"
    values = scrape(gw.base_url)
    assert total(values, "ttc_requests_total", route="/v1/completions", status_class="2xx") == 12
    assert not (mp / "counter_999999.db").exists()
