"""Bad-input fuzzing with schemathesis against the gateway's own OpenAPI schema: no 5xx, small error bodies.

CI runs a short pass (TTC_FUZZ_EXAMPLES, default 60 per operation); `scripts/long-tests.sh` runs thousands.
"""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from ..conftest import GatewayProcess, remote_env  # noqa: E402

pytestmark = pytest.mark.integration
EXAMPLES = int(os.environ.get("TTC_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def fuzz_gateway(gateway, tmp_path_factory):
    # Tight limits keep every valid generated request cheap on the CPU worker.
    env = remote_env(gateway, TTC_MAX_TOKENS_CAP="8", TTC_DEFAULT_MAX_TOKENS="8", TTC_MAX_N="2",
                     TTC_MAX_BODY_BYTES="65536")
    gw = GatewayProcess(env, tmp_path_factory.mktemp("fuzz") / "gateway.log")
    try:
        gw.wait_ready(90)
        yield gw
    finally:
        gw.stop()


def test_no_5xx_and_small_errors(fuzz_gateway):
    # Driven by hand rather than schemathesis' pytest plugin, which does not load under this pytest.
    schema = schemathesis.openapi.from_url(fuzz_gateway.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    seen: dict[int, int] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            response = case.call(base_url=fuzz_gateway.base_url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (op.path, response.status_code, response.text[:500])
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert len(response.content) < 2048

        check()
    assert sum(seen.values()) >= len(operations) and any(code >= 400 for code in seen), seen


def test_chunked_oversized_body_is_413(fuzz_gateway):
    def body():
        yield b'{"model": "smollm2-135m-instruct", "prompt": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(fuzz_gateway.base_url + "/v1/completions", content=body(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_still_serving_after_fuzzing(fuzz_gateway, model_name):
    r = httpx.post(fuzz_gateway.base_url + "/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200
