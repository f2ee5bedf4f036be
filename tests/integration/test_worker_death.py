"""Kill the policy worker: fast 503 with Retry-After (no hang, no 500), /ready says not ready, then it serves again."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_worker_death_gives_503_then_recovers(base_url, model_name):
    ready = httpx.get(base_url + "/ready").json()
    pid = ready["pools"]["policy"]["workers"][0]["pid"]
    os.killpg(pid, signal.SIGKILL)  # the worker and its engine-core process

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
        time.sleep(2)
    ready = httpx.get(base_url + "/ready").json()
    assert ready["ready"], ready
    worker = ready["pools"]["policy"]["workers"][0]
    assert worker["pid"] != pid and worker["restarts"] >= 1
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
