"""Every branch of one request through `serving/` and `api/` on the in-memory policy worker: limits, budgets and
their caps, quota reservation and settlement, `auto` dispatch, the response cache, domain errors and their HTTP
answers, streaming, deadline, drain and overload. Milliseconds each; the real-worker paths stay in
tests/integration."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from service.budget import PlainRequestCost, per_token_flops
from service.errors import BudgetExceeded, UnknownModel
from service.router.table import load as load_table
from service.serving.context import RequestContext
from service.serving.quota import flops_int
from service.serving.results import Answer, Stream
from service.protocol.completions import ChatCompletionRequest
from service.workers.pool import WorkerUnavailable

from .serving_fakes import ANSWER, MODEL, SHAPE, FakeRuntime, settings, sse_data, words, worker_error

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
KEY = "sk-test"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_TOKENS = len("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")  # one per character
TABLE = Path(__file__).resolve().parents[2] / "service" / "data" / "policy_table_smollm2.json"


def chat(**body):
    return {"model": MODEL, "messages": QUESTION, **body}


async def post(rt: FakeRuntime, body: dict, headers: dict | None = None, path: str = CHAT):
    async with rt.client() as client:
        return await client.post(path, json=body, headers=headers or {})


def error_of(r) -> dict:
    return r.json()["error"]


# --- serving alone: typed results and domain errors, no HTTP -------------------------------------------------

async def test_serving_returns_a_typed_answer_and_raises_domain_errors():
    rt = FakeRuntime(settings())
    result = await rt.serving.handle(RequestContext(route="chat", request_id="r"),
                                     ChatCompletionRequest(**chat(temperature=0)))
    assert isinstance(result, Answer) and result.body.choices[0].message.content == ANSWER
    with pytest.raises(UnknownModel):
        await rt.serving.handle(RequestContext(route="chat", request_id="r"),
                                ChatCompletionRequest(**dict(chat(), model="other")))
    with pytest.raises(BudgetExceeded):
        await rt.serving.handle(RequestContext(route="chat", request_id="r", headers={"x-ttc-budget-flops": "1"}),
                                ChatCompletionRequest(**chat()))
    assert rt.admission.running == 0  # every exit released its slot


async def test_a_stream_result_settles_only_when_closed():
    rt = FakeRuntime(settings())
    result = await rt.serving.handle(RequestContext(route="chat", request_id="r"),
                                     ChatCompletionRequest(**chat(stream=True)))
    assert isinstance(result, Stream) and result.on_close is not None
    assert rt.admission.running == 1  # the stream still holds its slot
    frames = [f async for f in result.events]
    await result.on_close()
    assert frames[-1] == b"data: [DONE]\n\n" and rt.admission.running == 0


# --- limits ----------------------------------------------------------------------------------------------------

async def test_unknown_model_is_404():
    r = await post(FakeRuntime(settings()), dict(chat(), model="gpt-4"))
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found" and error_of(r)["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"n": 65}, "n"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
])
async def test_limits_are_400_naming_the_field(body, param):
    r = await post(FakeRuntime(settings()), chat(**body))
    assert r.status_code == 400 and error_of(r)["param"] == param and error_of(r)["code"] == "invalid_value"


async def test_a_batch_counts_every_prompt_against_max_n():
    r = await post(FakeRuntime(settings(max_n=4)), {"model": MODEL, "prompt": ["a", "b", "c"], "n": 2},
                   path="/v1/completions")
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


async def test_key_max_n_lowers_the_server_cap():
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH], key_policies={KEY_HASH: {"max_n": 2}}))
    assert (await post(rt, chat(n=2), AUTH)).status_code == 200
    r = await post(rt, chat(n=3), AUTH)
    assert r.status_code == 400 and error_of(r)["param"] == "n"


# --- budgets ---------------------------------------------------------------------------------------------------

async def test_pass_through_budget_shrinks_max_tokens_to_fit_and_is_never_exceeded():
    rt = FakeRuntime(settings())
    budget = PlainRequestCost(SHAPE, [PROMPT_TOKENS], 1).worst_case(4) + 1  # room for 4 tokens, not 5
    r = await post(rt, chat(max_tokens=100), {"X-TTC-Budget-FLOPs": f"{budget:.6e}"})
    assert r.status_code == 200
    sent = rt.pool.generations()[-1]
    assert sent["max_tokens"] == 4
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert float(r.headers["x-ttc-flops"]) <= budget
    assert r.json()["ttc"]["budget"]["remaining_flops"] >= 0


async def test_a_budget_that_cannot_pay_one_token_is_400_budget_exceeded_and_counted():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(), {"X-TTC-Budget-FLOPs": "1000"})
    assert r.status_code == 400 and error_of(r)["code"] == "budget_exceeded"
    assert error_of(r)["param"] == "X-TTC-Budget-FLOPs" and rt.pool.generations() == []
    assert b'reason="too_small"' in rt.metrics.render_latest()[0]


async def test_a_search_budget_too_small_for_one_answer_is_400():
    r = await post(FakeRuntime(settings()), chat(ttc={"strategy": "greedy"}), {"X-TTC-Budget-FLOPs": "1e6"})
    assert r.status_code == 400 and error_of(r)["code"] == "budget_exceeded"


async def test_report_mode_does_not_limit_but_a_cap_enforces():
    tight = PlainRequestCost(SHAPE, [PROMPT_TOKENS], 1).worst_case(2)
    rt = FakeRuntime(settings())
    r = await post(rt, chat(max_tokens=50), {"X-TTC-Budget-FLOPs": f"{tight:.3e}", "X-TTC-Budget-Mode": "report"})
    assert r.status_code == 200 and rt.pool.generations()[-1]["max_tokens"] == 50
    capped = FakeRuntime(settings(max_budget_flops=tight))
    r = await post(capped, chat(max_tokens=50), {"X-TTC-Budget-FLOPs": "1e18", "X-TTC-Budget-Mode": "report"})
    assert r.status_code == 200 and capped.pool.generations()[-1]["max_tokens"] < 50


async def test_token_budget_is_priced_per_token():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(max_tokens=100), {"X-TTC-Budget-Tokens": str(PROMPT_TOKENS + 3)})
    sent = rt.pool.generations()[-1]["max_tokens"]
    assert r.status_code == 200 and 1 <= sent < 100
    limit = (PROMPT_TOKENS + 3) * per_token_flops(SHAPE)
    assert PlainRequestCost(SHAPE, [PROMPT_TOKENS], 1).worst_case(sent) <= limit


@pytest.mark.parametrize("headers, param", [
    ({"X-TTC-Budget-FLOPs": "-1"}, "X-TTC-Budget-FLOPs"),
    ({"X-TTC-Budget-FLOPs": "lots"}, "X-TTC-Budget-FLOPs"),
    ({"X-TTC-Budget-Tokens": "0"}, "X-TTC-Budget-Tokens"),
    ({"X-TTC-Deadline-Ms": "inf"}, "X-TTC-Deadline-Ms"),
    ({"X-TTC-Budget-Mode": "maybe"}, "X-TTC-Budget-Mode"),
])
async def test_malformed_budget_headers_are_400_naming_the_header(headers, param):
    r = await post(FakeRuntime(settings()), chat(), headers)
    assert r.status_code == 400 and error_of(r)["param"] == param


# --- quota -----------------------------------------------------------------------------------------------------

async def test_quota_reserves_the_budget_settles_the_exact_spend_and_refuses_beyond_it():
    quota = 1e10
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH], key_policies={KEY_HASH: {"flops_quota": quota}}))
    spent = 0
    for _ in range(2):
        r = await post(rt, chat(max_tokens=8), {**AUTH, "X-TTC-Budget-FLOPs": "4e9"})
        assert r.status_code == 200
        spent += int(r.headers["x-ttc-flops"])
    assert 0 < spent < 4e9
    assert rt.quota.used_locally(KEY_HASH) == spent == flops_int(spent)  # charged to the FLOP, not reserved
    r = await post(rt, chat(max_tokens=8), {**AUTH, "X-TTC-Budget-FLOPs": f"{quota - spent + 1:.0f}"})
    assert r.status_code == 429 and error_of(r)["code"] == "insufficient_quota"
    assert error_of(r)["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false" and int(r.headers["retry-after"]) > 0
    assert rt.quota.used_locally(KEY_HASH) == spent  # a refusal charges nothing


async def test_quota_without_a_requested_budget_runs_under_the_quota():
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH], key_policies={KEY_HASH: {"flops_quota": 1e9}}))
    r = await post(rt, chat(max_tokens=4000), {**AUTH, "X-TTC-Budget-Mode": "report"})
    assert r.status_code == 200 and r.json()["ttc"]["budget"]["flops"] == 1e9
    assert rt.pool.generations()[-1]["max_tokens"] < 4000  # enforced although the client said report


# --- strategies and auto ---------------------------------------------------------------------------------------

async def test_a_strategy_runs_on_the_policy_and_reports_its_spend():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(ttc={"strategy": "best_of_n", "n": 3, "selection": "majority"}))
    assert r.status_code == 200 and r.headers["x-ttc-strategy"] == "best_of_n"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ANSWER and body["ttc"]["answer"] == "4"
    assert body["ttc"]["samples"] == 3 and body["usage"]["flops"] == pytest.approx(float(r.headers["x-ttc-flops"]),
                                                                                    rel=1e-9, abs=1)
    assert body["usage"]["prompt_tokens"] == PROMPT_TOKENS  # the prompt once, not once per sample


async def test_strategy_outside_the_keys_list_is_403():
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH], key_policies={KEY_HASH: {"strategies": ["greedy"]}}))
    r = await post(rt, chat(ttc={"strategy": "beam_search"}), AUTH)
    assert r.status_code == 403 and error_of(r)["code"] == "strategy_not_allowed"
    assert (await post(rt, chat(ttc={"strategy": "greedy"}), AUTH)).status_code == 200


@pytest.mark.parametrize("ttc, param", [
    ({"strategy": "nope"}, "ttc.strategy"),
    ({"strategy": "best_of_n", "n": 0}, "ttc.n"),
    ({"strategy": "best_of_n", "n": 65}, "ttc.n"),
    ({"temperature": 0.3}, "ttc.strategy"),  # parameters without a strategy
    ({"strategy": 3}, "ttc.strategy"),
])
async def test_invalid_ttc_is_400_naming_the_parameter(ttc, param):
    r = await post(FakeRuntime(settings()), chat(ttc=ttc))
    assert r.status_code == 400 and error_of(r)["param"] == param and error_of(r)["code"] == "invalid_value"


async def test_what_a_strategy_cannot_honour_is_400():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(n=2, ttc={"strategy": "greedy"}))
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = await post(rt, chat(tools=tools, ttc={"strategy": "greedy"}))
    assert r.status_code == 400 and error_of(r)["code"] == "unsupported_parameter"
    r = await post(rt, {"model": MODEL, "prompt": ["a", "b"], "ttc": {"strategy": "greedy"}}, path="/v1/completions")
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


async def test_auto_needs_a_table_and_takes_no_parameters():
    r = await post(FakeRuntime(settings()), chat(), {"X-TTC-Strategy": "auto"})
    assert r.status_code == 400 and error_of(r)["param"] == "ttc.strategy" and "policy table" in error_of(r)["message"]
    r = await post(FakeRuntime(settings(), policy_table=load_table(TABLE)), chat(ttc={"strategy": "auto", "n": 4}))
    assert r.status_code == 400 and error_of(r)["param"] == "ttc.strategy" and "no parameters" in error_of(r)["message"]


async def test_auto_dispatches_through_the_registry_and_reports_its_choice():
    rt = FakeRuntime(settings(), policy_table=load_table(TABLE))
    r = await post(rt, chat(), {"X-TTC-Strategy": "auto", "X-TTC-Budget-FLOPs": "1e12"})
    assert r.status_code == 200 and r.headers["x-ttc-strategy"] == "auto"
    auto = r.json()["ttc"]["details"]["auto"]
    assert auto["strategy"] in ("best_of_n", "beam_search", "dvts", "rebase", "revisions", "particle_filtering",
                                "greedy")
    assert int(r.headers["x-ttc-difficulty"]) == auto["bin"] == r.json()["ttc"]["difficulty"]
    assert float(r.headers["x-ttc-flops"]) <= 1e12


# --- response cache --------------------------------------------------------------------------------------------

async def test_a_deterministic_request_is_served_from_the_cache_the_second_time():
    rt = FakeRuntime(settings())
    first = await post(rt, chat(temperature=0))
    calls = len(rt.pool.generations())
    second = await post(rt, chat(temperature=0))
    assert (first.headers["x-ttc-cache"], second.headers["x-ttc-cache"]) == ("miss", "hit")
    assert len(rt.pool.generations()) == calls  # no upstream call
    assert second.json()["choices"] == first.json()["choices"] and second.json()["usage"]["flops"] == 0.0
    assert second.json()["id"] != first.json()["id"]
    streamed = await post(rt, chat(temperature=0, stream=True, stream_options={"include_usage": True}))
    frames = sse_data(streamed.text)
    text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames[:-1] if f["choices"])
    assert streamed.headers["x-ttc-cache"] == "hit" and text == ANSWER and frames[-1] == "[DONE]"


async def test_cache_is_bypassed_for_sampling_and_per_tenant():
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH, hashlib.sha256(b"other").hexdigest()]))
    assert (await post(rt, chat(temperature=0.7), AUTH)).headers["x-ttc-cache"] == "bypass"
    await post(rt, chat(temperature=0), AUTH)
    r = await post(rt, chat(temperature=0), {"Authorization": "Bearer other"})
    assert r.headers["x-ttc-cache"] == "miss"  # another tenant's identical prompt
    r = await post(rt, chat(temperature=0), {**AUTH, "Cache-Control": "no-cache"})
    assert r.headers["x-ttc-cache"] == "bypass"


# --- worker failures -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure, status, code", [
    (WorkerUnavailable("policy", "connection refused"), 503, "workers_unavailable"),
    (worker_error(400, "prompt too long"), 400, "upstream_rejected"),
    (worker_error(500, "engine dead"), 502, "upstream_error"),
])
@pytest.mark.parametrize("ttc", [None, {"strategy": "greedy"}])
async def test_worker_failures_map_to_openai_errors(failure, status, code, ttc):
    rt = FakeRuntime(settings())
    rt.pool.fail = failure
    r = await post(rt, chat(**({"ttc": ttc} if ttc else {})))
    assert r.status_code == status and error_of(r)["code"] == code
    assert set(error_of(r)) == {"message", "type", "param", "code"}
    if status == 503:
        assert r.headers["retry-after"] == str(rt.settings.retry_after_s)
    assert rt.admission.running == 0


async def test_a_worker_failing_mid_stream_ends_with_an_in_band_error_and_done():
    rt = FakeRuntime(settings())
    rt.pool.fail_stream_after = 2
    r = await post(rt, chat(stream=True))
    assert r.status_code == 200
    frames = sse_data(r.text)
    assert frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "workers_unavailable"
    assert b'status_class="5xx"' in rt.metrics.render_latest()[0] and rt.admission.running == 0


# --- streaming -------------------------------------------------------------------------------------------------

async def test_pass_through_stream_carries_usage_with_flops_when_asked():
    rt = FakeRuntime(settings())
    r = await post(rt, chat(stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-ttc-strategy"] == "none"
    frames = sse_data(r.text)
    usage = frames[-2]
    assert frames[-1] == "[DONE]" and usage["choices"] == [] and usage["usage"]["flops"] > 0
    assert usage["ttc"]["strategy"] == "none"
    text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames[:-2])
    assert text == ANSWER
    without = sse_data((await post(rt, chat(stream=True))).text)
    assert all(f == "[DONE]" or f["choices"] for f in without)  # no usage chunk unless asked


async def test_search_stream_sends_the_answer_then_usage_and_done():
    rt = FakeRuntime(settings())
    r = await post(rt, {"model": MODEL, "prompt": "What is 2 + 2?", "stream": True,
                        "stream_options": {"include_usage": True}, "ttc": {"strategy": "best_of_n", "n": 2,
                                                                           "selection": "majority"}},
                   path="/v1/completions")
    frames = sse_data(r.text)
    text = "".join(f["choices"][0]["text"] for f in frames if f != "[DONE]" and f["choices"])
    assert text == ANSWER and frames[-1] == "[DONE]"
    assert frames[-2]["ttc"]["strategy"] == "best_of_n" and frames[-2]["usage"]["flops"] > 0
    assert rt.admission.running == 0


# --- deadline, drain, overload ---------------------------------------------------------------------------------

async def test_deadline_with_error_action_is_504():
    rt = FakeRuntime(settings(deadline_action="error"))
    rt.pool.delay_s = 2.0
    r = await post(rt, chat(), {"X-TTC-Deadline-Ms": "50"})
    assert r.status_code == 504 and error_of(r)["code"] == "deadline_exceeded"
    assert rt.admission.running == 0


async def test_deadline_with_best_action_answers_with_the_search_so_far():
    steps = "".join(f"{i} + 1 = {i + 1}\n" for i in range(1, 12)) + "The answer is 12."
    rt = FakeRuntime(settings(deadline_action="best"))
    rt.pool.answer = lambda prompt: steps
    rt.pool.delay_s = 0.1  # one search round per 100 ms; the deadline allows about seven
    r = await post(rt, chat(max_tokens=200, ttc={"strategy": "beam_search", "n": 2, "beam_width": 2}),
                   {"X-TTC-Deadline-Ms": "1000"})
    assert r.status_code == 200, r.text
    ttc = r.json()["ttc"]
    assert ttc["budget_exhausted"] is True and 1 <= ttc["steps"] < 12  # stopped early, with an answer so far
    assert r.json()["choices"][0]["message"]["content"]


async def test_draining_gateway_refuses_with_503_and_retry_after():
    rt = FakeRuntime(settings())
    rt.draining = True
    r = await post(rt, chat())
    assert r.status_code == 503 and error_of(r)["code"] == "workers_unavailable" and "retry-after" in r.headers


async def test_overload_is_a_fast_503_overloaded():
    rt = FakeRuntime(settings(max_concurrency=1, max_queue=0))
    rt.pool.delay_s = 0.3
    async with rt.client() as client:
        slow = asyncio.ensure_future(client.post(CHAT, json=chat()))
        while rt.admission.running == 0:
            await asyncio.sleep(0.005)
        r = await client.post(CHAT, json=chat())
        assert r.status_code == 503 and error_of(r)["code"] == "overloaded" and "retry-after" in r.headers
        assert (await slow).status_code == 200


# --- the front door --------------------------------------------------------------------------------------------

async def test_front_door_auth_size_and_request_id():
    rt = FakeRuntime(settings(api_key_hashes=[KEY_HASH], max_body_bytes=2000))
    r = await post(rt, chat())
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key" and r.headers["x-request-id"]
    r = await post(rt, chat(), {"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await post(rt, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, AUTH)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = await post(rt, chat(), {**AUTH, "X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    async with rt.client() as client:
        assert (await client.get("/health")).status_code == 200  # probes stay open
        assert (await client.get("/v1/models", headers=AUTH)).json()["data"][0]["id"] == MODEL


async def test_validation_errors_are_openai_shaped_400s():
    rt = FakeRuntime(settings())
    r = await post(rt, {"model": MODEL})
    assert r.status_code == 400 and error_of(r)["code"] == "missing_required_parameter"
    r = await post(rt, chat(frobnicate=True))
    assert r.status_code == 400 and error_of(r)["code"] == "unsupported_parameter"


def test_fake_worker_cuts_whole_words():
    assert "".join(words(ANSWER)) == ANSWER and len(words(ANSWER)) == 9
