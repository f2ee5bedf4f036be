"""api/fastpath.py answers exactly as the FastAPI app does: every request here goes once through the gateway's app
and once through the same FastAPI app behind the same front door without the fast path, and the two answers must be
the same. The test also checks which requests the fast path took, so a fast path that never fires cannot pass."""

from __future__ import annotations

import httpx
import orjson
import pytest

from service.api.middleware import FrontDoor
from service.workers.pool import WorkerError

from .serving_fakes import MODEL, FakeRuntime, settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4}
JSON = {"content-type": "application/json", "x-request-id": "req-fixed"}
VOLATILE = ("id", "created", "created_at")


class Counting:
    """Counts the requests that reach the FastAPI app."""

    def __init__(self, app):
        self.app = app
        self.http_calls = 0

    def __getattr__(self, name):  # state, exception_handlers: the fast path reads them off the app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.http_calls += 1
        await self.app(scope, receive, send)


def clients(rt: FakeRuntime, raise_app_exceptions: bool = True):
    from service.api.app import create_app

    front = create_app(rt.settings, rt)
    fastapi_app = Counting(front.app.app)
    front.app.app = fastapi_app
    bare = FrontDoor(fastapi_app, max_body_bytes=rt.settings.max_body_bytes, api_key_hashes=[],
                     protect_metrics=False)

    def client(app):
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
                                 base_url="http://gateway")

    return client(front), client(bare), fastapi_app


def comparable(r: httpx.Response):
    try:
        body = r.json()
    except ValueError:
        return r.status_code, r.headers.get("content-type"), [_strip(e) for e in _events(r.text)]
    return r.status_code, r.headers.get("content-type"), _strip(body), _headers(r)


def _strip(body):
    """Without generated ids and times, at any depth."""
    if isinstance(body, dict):
        return {k: _strip(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [_strip(v) for v in body]
    return body


def _events(text: str):
    return [orjson.loads(f[6:]) if f[6:] != "[DONE]" else f[6:] for f in text.split("\n\n") if f.startswith("data: ")]


def _headers(r: httpx.Response):
    return {k: v for k, v in r.headers.items() if k.startswith("x-") or k in ("retry-after", "content-length")}


CASES = [
    # (name, body bytes, headers, whether the fast path serves it)
    ("valid chat", orjson.dumps(CHAT), JSON, True),
    ("charset parameter", orjson.dumps(CHAT), {**JSON, "content-type": "application/json; charset=utf-8"}, True),
    ("valid stream", orjson.dumps({**CHAT, "stream": True}), JSON, True),
    ("unknown model (domain error)", orjson.dumps({**CHAT, "model": "nope"}), JSON, True),
    ("refused field (API error)", orjson.dumps({**CHAT, "web_search_options": {"x": 1}}), JSON, True),
    ("ttc parameters without strategy", orjson.dumps({**CHAT, "ttc": {"n": 4}}), JSON, True),
    ("broken JSON", b'{"model": "tiny", "messages": [', JSON, False),
    ("JSON array", b"[1, 2]", JSON, False),
    ("JSON null", b"null", JSON, False),
    ("empty body", b"", JSON, False),
    ("NaN (stdlib json accepts it, orjson does not)", b'{"model": "tiny", "messages": [], "temperature": NaN}',
     JSON, False),
    ("integer beyond 64 bits", orjson.dumps(CHAT)[:-1] + b', "seed": 123456789012345678901234567890}', JSON, False),
    ("validation error", orjson.dumps({"model": MODEL}), JSON, False),
    ("lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', JSON, False),
    ("text/plain", orjson.dumps(CHAT), {**JSON, "content-type": "text/plain"}, False),
    ("no content type", orjson.dumps(CHAT), {"x-request-id": "req-fixed"}, False),
    ("vendor +json type", orjson.dumps(CHAT), {**JSON, "content-type": "application/vnd.x+json"}, False),
]


COMPLETION = {"model": MODEL, "prompt": "2 + 2 =", "max_tokens": 4}
COMPLETION_CASES = [
    ("valid completion", orjson.dumps(COMPLETION), JSON, True),
    ("valid completion stream", orjson.dumps({**COMPLETION, "stream": True}), JSON, True),
    ("batch of prompts", orjson.dumps({**COMPLETION, "prompt": ["1 + 1 =", "2 + 2 ="]}), JSON, True),
    ("completion without prompt", orjson.dumps({"model": MODEL}), JSON, False),
    ("broken completion JSON", b'{"model": ', JSON, False),
]


@pytest.mark.parametrize("path,name,body,headers,fast",
                         [("/v1/chat/completions", *c) for c in CASES]
                         + [("/v1/completions", *c) for c in COMPLETION_CASES],
                         ids=[c[0] for c in CASES + COMPLETION_CASES])
async def test_same_answer_with_and_without_the_fast_path(path, name, body, headers, fast):
    rt = FakeRuntime(settings())
    via_fast, via_fastapi, counter = clients(rt)
    async with via_fast as a, via_fastapi as b:
        ra = await a.post(path, content=body, headers=headers)
        took_fast_path = counter.http_calls == 0
        rb = await b.post(path, content=body, headers=headers)
    assert took_fast_path == fast
    assert comparable(ra) == comparable(rb)


async def test_other_routes_and_methods_go_to_fastapi():
    rt = FakeRuntime(settings())
    via_fast, via_fastapi, counter = clients(rt)
    async with via_fast as a, via_fastapi as b:
        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completions/"),
                             ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/responses")):
            kw = {"content": orjson.dumps({"model": MODEL, "input": "hi"}), "headers": JSON} if method == "POST" else {}
            before = counter.http_calls
            ra = await a.request(method, path, **kw)
            assert counter.http_calls == before + 1, path
            rb = await b.request(method, path, **kw)
            assert (ra.status_code, _strip(ra.json()) if ra.content else None) == \
                (rb.status_code, _strip(rb.json()) if rb.content else None), path


async def test_an_unexpected_error_is_a_500_then_raised_as_fastapi_does():
    rt = FakeRuntime(settings())
    rt.pool.fail = RuntimeError("boom")
    via_fast, via_fastapi, counter = clients(rt, raise_app_exceptions=False)
    async with via_fast as a, via_fastapi as b:
        ra = await a.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
        rb = await b.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
    assert counter.http_calls == 1  # only the FastAPI-only client reached FastAPI
    assert ra.status_code == rb.status_code == 500
    assert comparable(ra) == comparable(rb)
    via_fast, _, _ = clients(rt)
    async with via_fast as a:
        with pytest.raises(RuntimeError, match="boom"):
            await a.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)


async def test_a_worker_error_maps_to_the_same_status():
    rt = FakeRuntime(settings())
    rt.pool.fail = WorkerError("policy", 400, {"error": {"message": "prompt too long"}})
    via_fast, via_fastapi, _ = clients(rt)
    async with via_fast as a, via_fastapi as b:
        ra = await a.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
        rb = await b.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
    assert ra.status_code == rb.status_code == 400
    assert comparable(ra) == comparable(rb)


async def _raw(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """One request straight over ASGI, the body in `chunks`; returns the sent messages or the raised exception."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "scheme": "http", "query_string": b"", "headers": headers, "http_version": "1.1",
             "server": ("gateway", 80), "client": ("127.0.0.1", 1), "asgi": {"version": "3.0"}}
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc).__name__, [(m["type"], m.get("status"), m.get("body")) for m in sent]
    return None, [(m["type"], m.get("status"), m.get("body")) for m in sent]


async def test_a_body_longer_than_declared_and_over_the_limit_is_handled_as_before():
    from service.api.app import create_app

    rt = FakeRuntime(settings(max_body_bytes=100))
    front = create_app(rt.settings, rt)
    bare = FrontDoor(front.app.app, max_body_bytes=100, api_key_hashes=[], protect_metrics=False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"10"), (b"x-request-id", b"req-1")]
    chunks = [b'{"model": "tiny", ', b'"messages": [{"role": "user", "content": "' + b"x" * 200 + b'"}]}']
    got = await _raw(front, headers, chunks)
    assert got == await _raw(bare, headers, chunks)
    assert got[1] and got[1][0][1] in (400, 413)
