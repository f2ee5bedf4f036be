"""The one body builder (serving/bodies.py over protocol/bodies.py) and the typed request `ttc` (protocol/ttc.py):
a search answer, a forwarded answer, a cached one and their streams come out in the same shape, carry the same
`ttc`, and parse with the openai client's own models; a bad `ttc` value is a 400 naming the field."""

from __future__ import annotations

import openai.types
import pytest
from openai._models import construct_type
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from service.metering import Meter
from service.protocol.bodies import TTCInfo, Usage
from service.protocol.completions import ChatCompletionRequest
from service.protocol.ttc import TTCExtension
from service.serving import bodies
from service.serving.context import RequestContext

from .serving_fakes import ANSWER, MODEL, FakeRuntime, settings, sse_data

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
USAGE = {"include_usage": True}


def chat(**body):
    return {"model": MODEL, "messages": QUESTION, **body}


def completion(**body):
    return {"model": MODEL, "prompt": "What is 2 + 2?", **body}


async def post(rt: FakeRuntime, body: dict, path: str = CHAT, headers: dict | None = None):
    async with rt.client() as client:
        return await client.post(path, json=body, headers=headers or {})


def streamed(text: str, route: str) -> tuple[str, list[dict], dict]:
    """(the streamed text, the content chunks, the usage chunk) of an SSE body that ends with usage and [DONE]."""
    frames = sse_data(text)
    assert frames[-1] == "[DONE]"
    pieces, last = frames[:-2], frames[-2]
    key = (lambda c: c["delta"].get("content") or "") if route == "chat" else (lambda c: c["text"])
    return "".join(key(f["choices"][0]) for f in pieces), pieces, last


def same_shape(a, b) -> bool:
    """The same keys at every level (values may differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_shape(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_shape(x, y) for x, y in zip(a, b))
    return isinstance(a, (dict, list)) == isinstance(b, (dict, list))


# --- one shape for every path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, route", [
    (CHAT, chat(ttc={"strategy": "best_of_n", "n": 3, "selection": "majority"}), "chat"),
    (COMPLETIONS, completion(ttc={"strategy": "greedy"}, max_tokens=6), "completions"),
    (CHAT, chat(temperature=0.7), "chat"),  # pass-through (sampling: never cached)
    (COMPLETIONS, completion(temperature=0.7), "completions"),
])
async def test_a_stream_carries_the_same_answer_usage_and_ttc_as_the_json_body(path, body, route):
    whole = (await post(FakeRuntime(settings()), body, path)).json()
    stream = await post(FakeRuntime(settings()), dict(body, stream=True, stream_options=USAGE), path)
    text, pieces, last = streamed(stream.text, route)
    choice = whole["choices"][0]
    assert text == (choice["message"]["content"] if route == "chat" else choice["text"])
    assert pieces[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert last["choices"] == [] and last["usage"] == whole["usage"] and last["ttc"] == whole["ttc"]
    assert last["usage"]["flops"] == whole["ttc"]["flops"]["total"] > 0
    for frame in pieces + [last]:
        assert frame["id"] == pieces[0]["id"] and frame["object"] == pieces[0]["object"]
        assert frame["system_fingerprint"] == whole["system_fingerprint"] and frame["model"] == whole["model"]


@pytest.mark.parametrize("path, body, route", [(CHAT, chat(temperature=0), "chat"),
                                               (COMPLETIONS, completion(seed=3), "completions")])
async def test_a_cached_answer_has_the_shape_of_the_first_and_says_it_cost_nothing(path, body, route):
    rt = FakeRuntime(settings())
    first = await post(rt, body, path)
    hit = await post(rt, body, path)
    replay = await post(rt, dict(body, stream=True, stream_options=USAGE), path)
    assert (first.headers["x-ttc-cache"], hit.headers["x-ttc-cache"], replay.headers["x-ttc-cache"]) == \
        ("miss", "hit", "hit")
    a, b = first.json(), hit.json()
    assert same_shape(a, b) and a["choices"] == b["choices"] and b["id"] != a["id"]
    assert {k: v for k, v in b["usage"].items() if k != "flops"} == {k: v for k, v in a["usage"].items()
                                                                       if k != "flops"}
    assert b["usage"]["flops"] == 0.0 and b["ttc"]["flops"]["total"] == 0.0
    assert (b["ttc"]["strategy"], b["ttc"]["cache"]) == ("none", "hit")
    assert b["system_fingerprint"] == a["system_fingerprint"]
    text, _, last = streamed(replay.text, route)
    choice = b["choices"][0]
    assert text == (choice["message"]["content"] if route == "chat" else choice["text"]) == ANSWER
    assert last["usage"] == b["usage"] and last["ttc"] == b["ttc"]


async def test_an_unreadable_cache_entry_is_a_miss():
    rt = FakeRuntime(settings())
    ctx = RequestContext(route="chat", request_id="r", model=MODEL)
    key = rt.serving.response_cache.key_for(ctx, ChatCompletionRequest(**chat(temperature=0)),
                                            rt.settings.default_max_tokens)
    await post(rt, chat(temperature=0))
    assert await rt.cache.get(key) is not None  # the key the gateway stored under
    for junk in (b"not json", b'{"id": 1}', b"[]"):
        await rt.cache.set(key, junk, 60)
        r = await post(rt, chat(temperature=0))
        assert r.status_code == 200 and r.headers["x-ttc-cache"] == "miss" and r.json()["choices"][0]["message"]


# --- the wire form of the builders ------------------------------------------------------------------------------

def test_the_builders_keep_openais_nulls_and_leave_out_what_is_absent():
    meter = Meter()
    meter.add_policy(100.0, prompt_tokens=10, cached_tokens=0, completion_tokens=3)
    ttc = bodies.ttc_info("greedy", meter, answer=None, score=None, details={"x": None}, cache="bypass")
    body = bodies.answer("chat", "chatcmpl-1", 7, MODEL, "hi", "stop", bodies.usage(meter), ttc).wire()
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": MODEL,
        "system_fingerprint": bodies.system_fingerprint(MODEL),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "flops": 100.0},
        "ttc": {"strategy": "greedy", "flops": {"policy": 100.0, "reward": 0.0, "total": 100.0},
                "tokens": {"policy_prompt": 10, "policy_cached": 0, "policy_completion": 3, "reward": 0},
                "calls": {"policy": 1, "reward": 0}, "cache": "bypass", "details": {"x": None}},
    }
    meter.add_policy(0.0, prompt_tokens=0, cached_tokens=4, completion_tokens=0)
    assert bodies.usage(meter).wire()["prompt_tokens_details"] == {"cached_tokens": 4}
    ctx = RequestContext(route="chat", request_id="r")
    content = bodies.chunk(ctx, "c", MODEL, content="x").wire()["choices"][0]
    assert content == {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}


def test_a_forwarded_answer_keeps_vllms_fields_and_drops_its_null_extras():
    upstream = {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": MODEL, "service_tier": None,
                "choices": [{"index": 0, "text": "4", "logprobs": None, "finish_reason": "stop", "stop_reason": None,
                             "token_ids": None, "prompt_logprobs": None}],
                "usage": {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1,
                          "prompt_tokens_details": None}, "kv_transfer_params": None}
    ctx = RequestContext(route="completions", request_id="r", cache_status="bypass", budget_flops=1e9)
    body = bodies.decorate_upstream(upstream, ctx, "none").wire()
    assert "service_tier" not in body and "kv_transfer_params" not in body
    assert body["choices"] == [{"index": 0, "text": "4", "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3, "flops": 0.0}
    assert body["ttc"]["budget"] == {"flops": 1e9, "remaining_flops": 1e9} and body["ttc"]["cache"] == "bypass"
    assert TTCInfo.model_validate(body["ttc"]).wire() == body["ttc"]  # what is stored reads back the same
    assert Usage.model_validate(body["usage"]).wire() == body["usage"]


# --- the openai client reads them -------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [chat(ttc={"strategy": "best_of_n", "n": 2, "selection": "majority"}),
                                  chat(temperature=0), chat(n=2, max_tokens=3)])
async def test_openais_models_parse_our_chat_bodies_and_chunks(body):
    rt = FakeRuntime(settings())
    for _ in range(2):  # the second deterministic one is a cache hit
        whole = (await post(rt, body)).json()
        parsed = ChatCompletion.model_validate(whole)
        assert parsed.choices[0].message.content and parsed.usage.model_extra["flops"] == whole["usage"]["flops"]
        assert parsed.model_extra["ttc"] == whole["ttc"] and parsed.system_fingerprint.startswith("fp_ttc_")
        frames = sse_data((await post(rt, dict(body, stream=True, stream_options=USAGE))).text)
        chunks = [ChatCompletionChunk.model_validate(f) for f in frames[:-1]]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
        assert chunks[-1].model_extra["ttc"]["strategy"] == whole["ttc"]["strategy"]


@pytest.mark.parametrize("body", [completion(ttc={"strategy": "greedy"}), completion(temperature=0),
                                  {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4}])
async def test_openais_completion_model_parses_our_completion_bodies_and_chunks(body):
    rt = FakeRuntime(settings())
    for _ in range(2):
        whole = (await post(rt, body, COMPLETIONS)).json()
        parsed = openai.types.Completion.model_validate(whole)
        assert parsed.object == "text_completion" and parsed.choices[0].text
        assert parsed.usage.model_extra["flops"] == whole["usage"]["flops"]
        frames = sse_data((await post(rt, dict(body, stream=True, stream_options=USAGE), COMPLETIONS)).text)[:-1]
        # Content chunks have a null finish_reason, which openai's Completion does not allow (OpenAI's own streams
        # have it too): the client reads chunks leniently (construct_type); the finish and usage chunks validate.
        read = [construct_type(type_=openai.types.Completion, value=f) for f in frames]
        assert "".join(c.choices[0].text for c in read if c.choices)
        ends = [openai.types.Completion.model_validate(f) for f in frames if not f["choices"]
                or f["choices"][0]["finish_reason"]]
        assert ends[-1].choices == [] and ends[-1].usage.completion_tokens > 0 and len(ends) >= 2
        assert ends[-1].model_extra["ttc"]["flops"]["total"] == ends[-1].usage.model_extra["flops"]


# --- the request's typed `ttc` ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ttc, param", [
    ({"budget_flops": "lots"}, "ttc.budget_flops"),
    ({"budget_flops": -1}, "ttc.budget_flops"),
    ({"budget_flops": True}, "ttc.budget_flops"),
    ({"budget_flops": "inf"}, "ttc.budget_flops"),
    ({"budget_tokens": 0}, "ttc.budget_tokens"),
    ({"budget_tokens": 12.5}, "ttc.budget_tokens"),
    ({"budget_tokens": [12]}, "ttc.budget_tokens"),
    ({"deadline_ms": "soon"}, "ttc.deadline_ms"),
    ({"budget_mode": "maybe"}, "ttc.budget_mode"),
    ({"strategy": 3}, "ttc.strategy"),
    ({"strategy": ["greedy"]}, "ttc.strategy"),
])
@pytest.mark.parametrize("path", [CHAT, RESPONSES])
async def test_a_bad_ttc_value_is_an_openai_400_naming_the_field(ttc, param, path):
    body = chat(ttc=ttc) if path == CHAT else {"model": MODEL, "input": "What is 2 + 2?", "ttc": ttc}
    rt = FakeRuntime(settings())
    r = await post(rt, body, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "invalid_value")
    assert param in r.json()["error"]["message"] and not rt.pool.generations()


def test_the_typed_ttc_reads_figures_as_sent_and_keeps_strategy_parameters_apart():
    ttc = TTCExtension.model_validate({"strategy": "best_of_n", "n": 4, "selection": "majority",
                                       "budget_flops": "2.5e13", "budget_tokens": 12.0, "deadline_ms": "500",
                                       "budget_mode": None})
    assert (ttc.strategy, ttc.budget_flops, ttc.budget_tokens, ttc.deadline_ms, ttc.budget_mode) == \
        ("best_of_n", 2.5e13, 12, 500, None)
    assert type(ttc.budget_tokens) is int and ttc.params == {"n": 4, "selection": "majority"}


async def test_headers_still_win_over_the_typed_body():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(ttc={"budget_flops": 1e15, "strategy": "best_of_n", "n": 2, "selection": "majority"}),
                   headers={"X-TTC-Budget-FLOPs": "1e12", "X-TTC-Strategy": "greedy"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttc.n"  # greedy takes no n: the header won
    r = await post(rt, chat(ttc={"budget_flops": 1e15, "strategy": "greedy"}), headers={"X-TTC-Budget-FLOPs": "1e12"})
    assert r.status_code == 200 and r.json()["ttc"]["budget"]["flops"] == 1e12 and r.json()["ttc"]["strategy"] == \
        "greedy"
