"""Kill the policy worker: fast 503 with Retry-After (no hang, no 500), /ready says not ready, then it serves again."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_worker_death_gives_503_then_recovers(base_url, model_name):
    ready = httpx.get(base_url + "/ready").json()
    pid = ready["pools"]["policy"]["workers"][0]["pid"]
    long = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.9,
            "stop": ["never-appears"]}

    def stream_lines() -> list[str]:
        with httpx.stream("POST", base_url + "/v1/completions", json=dict(long, stream=True), timeout=60) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream_lines)
        plain = pool.submit(httpx.post, base_url + "/v1/completions", json=long, timeout=60)
        time.sleep(2.0)  # both are generating
        os.killpg(pid, signal.SIGKILL)  # the worker and its engine-core process
        lines = streaming.result(timeout=30)
        mid_request = plain.result(timeout=30)
    # Mid-stream: an in-band OpenAI error event, then [DONE]; never a hang.
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == "workers_unavailable"
    # Mid-request without streaming: 503 with Retry-After, not a bare 500.
    assert mid_request.status_code == 503, mid_request.text
    assert int(mid_request.headers["retry-after"]) > 0

    body = {"model": model_name, "prompt": "Hello", "max_tokens": 4}
    deadline = time.monotonic() + 10
    saw_503 = None
    while time.monotonic() < deadline:
        started = time.monotonic()
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=30)
        assert time.monotonic() - started < 10, "a request to a dead worker must fail fast"
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            saw_503 = r
            break
        time.sleep(0.2)
    assert saw_503 is not None, "requests kept succeeding after the worker was killed"
    assert int(saw_503.headers["retry-after"]) > 0
    assert saw_503.json()["error"]["code"] == "workers_unavailable"

    r = httpx.get(base_url + "/ready")
    assert r.status_code == 503 and r.json()["ready"] is False

    # The supervisor restarts the worker; the gateway serves again.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and httpx.get(base_url + "/ready").status_code != 200:
        time.sleep(0.5)
    ready = httpx.get(base_url + "/ready").json()
    assert ready["ready"], ready
    worker = ready["pools"]["policy"]["workers"][0]
    assert worker["pid"] != pid and worker["restarts"] >= 1
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
