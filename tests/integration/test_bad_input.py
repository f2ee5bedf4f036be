"""Bad input gets an OpenAI-shaped 400/404/413, never a 422 or 500, and the service keeps serving."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and len(r.content) < 2048
    if param != "__any__":
        assert err["param"] == param
    return err


@pytest.fixture()
def post(base_url):
    def _post(path: str, **kw) -> httpx.Response:
        return httpx.post(base_url + path, timeout=60, **kw)

    return _post


def test_malformed_json(post):
    r = post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_wrong_types(post, model_name):
    r = post("/v1/chat/completions", json={"model": model_name, "messages": "hello"})
    assert_openai_error(r, 400, "messages")
    r = post("/v1/completions", json={"model": model_name, "prompt": "x", "temperature": "hot"})
    assert_openai_error(r, 400, "temperature")


def test_empty_messages(post, model_name):
    assert_openai_error(post("/v1/chat/completions", json={"model": model_name, "messages": []}), 400, "messages")


def test_unknown_role(post, model_name):
    r = post("/v1/chat/completions", json={"model": model_name, "messages": [{"role": "wizard", "content": "hi"}]})
    assert_openai_error(r, 400)


def test_unknown_model(post):
    err = assert_openai_error(post("/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"


def test_negative_max_tokens(post, model_name):
    r = post("/v1/completions", json={"model": model_name, "prompt": "x", "max_tokens": -5})
    assert_openai_error(r, 400, "max_tokens")


def test_unknown_and_unsupported_fields(post, model_name):
    err = assert_openai_error(post("/v1/completions", json={"model": model_name, "prompt": "x", "best_of": 2}),
                              400, "best_of")
    assert "best_of" in err["message"]
    r = post("/v1/chat/completions", json={"model": model_name, "messages": [{"role": "user", "content": "x"}],
                                           "frobnicate": True})
    assert_openai_error(r, 400, "frobnicate")


def test_oversized_body(post, model_name):
    big = "x" * (2 * 1024 * 1024)
    err = assert_openai_error(post("/v1/completions", json={"model": model_name, "prompt": big}), 413)
    assert err["code"] == "request_too_large"


def test_unknown_path_is_openai_404(base_url):
    assert_openai_error(httpx.get(base_url + "/v1/nothing-here"), 404)


def test_context_overflow_is_400(post, model_name):
    r = post("/v1/completions", json={"model": model_name, "prompt": "hello " * 3000, "max_tokens": 10})
    assert_openai_error(r, 400)


def test_still_serving_after_bad_input(client, model_name):
    resp = client.completions.create(model=model_name, prompt="Hello", max_tokens=3)
    assert resp.choices[0].text is not None
