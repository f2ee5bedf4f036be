"""Pure logic of issue 14: canonical JSON voting for structured best-of-N, the chat request's new fields, and the
Responses API translation (request -> chat request, chat answer/chunks -> Response object/events)."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from service.protocol.completions import ChatCompletionRequest
from service.protocol.tools import refused_fields
from service.api.responses_api import EventStream, from_chat
from service.protocol.responses import ResponsesRequest, to_chat
from service.serving.passthrough import upstream_payload
from service.strategies import build_strategy
from service.strategies.base import Problem
from service.strategies.voting import Candidate, json_answer, json_equal, select
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FlopMeter, round_robin


def test_json_answer_is_canonical():
    assert json_answer('{"b": 1, "a": [1.0, "x"]}') == json_answer('{ "a":[1,"x"],"b":1.0 }') == '{"a":[1,"x"],"b":1}'
    assert json_answer("not json") is None and json_answer('{"a": 1') is None
    # Text is not normalised: case and spaces inside strings are part of the value.
    assert json_answer('{"a": "X Y"}') != json_answer('{"a": "xy"}')
    assert json_equal('{"a":1}', '{"a":1}') and not json_equal(None, None)


def test_majority_over_parsed_json_values():
    texts = ['{"name": "Ann", "age": 3}', '{"age":3,"name":"Ann"}', '{"name": "Bob", "age": 3}', "oops"]
    cands = [Candidate.of(t, extract=json_answer) for t in texts]
    choice = select(cands, "majority", json_equal)
    assert choice.candidate.answer == '{"age":3,"name":"Ann"}'
    assert choice.vote_share == pytest.approx(0.5)  # 2 of 4; the unparseable one casts no vote
    assert choice.tally[0] == ('{"age":3,"name":"Ann"}', 2.0)


async def test_best_of_n_votes_over_json_when_structured():
    samples = ['{"x": 1, "y": 2}', '{"y":2, "x":1}', '{"x": 5}']
    meter = FlopMeter()
    policy = FakePolicy(round_robin(samples), meter)
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=20, structured=True)
    result = await build_strategy("best_of_n", {"n": 3, "selection": "majority"}).run(
        problem, policy, None, meter.budget(None))
    assert result.answer == '{"x":1,"y":2}'
    assert result.details["vote_share"] == pytest.approx(2 / 3)


def test_nulls_mean_defaults_but_unknown_fields_still_fail():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "n": None, "stream": None, "logprobs": None, "prediction": None,
                                                "store": True, "metadata": {"k": "v"}, "service_tier": "auto"})
    assert req.n == 1 and req.stream is False
    payload = upstream_payload(req, "m", 8)
    assert not {"store", "metadata", "service_tier", "prediction"} & set(payload)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "frobnicate": None})


def test_tools_and_schema_forwarded_as_sent():
    schema = {"type": "object", "properties": {"a": {"type": "string", "default": None}}}
    req = ChatCompletionRequest.model_validate({
        "model": "m", "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.1, "logit_bias": {"50256": -100},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None, "refusal": None, "audio": None,
                      "tool_calls": [{"id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}], "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    p = upstream_payload(req, "m", 8)
    assert p["response_format"]["json_schema"]["schema"] == schema  # wire name, null defaults kept
    assert p["tools"][0]["function"]["parameters"] == schema
    assert p["messages"][1] == {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert (p["top_k"], p["min_p"], p["repetition_penalty"], p["tool_choice"]) == (4, 0.1, 1.1, "auto")


@pytest.mark.parametrize("body, field", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_refused_fields_name_themselves(body, field):
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    name, why = refused_fields(req.__dict__)
    assert name == field and why


def test_media_content_is_refused_with_a_reason():
    with pytest.raises(ValidationError, match="reads text only"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})


def test_responses_request_becomes_a_chat_request():
    req = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief", "max_output_tokens": 12, "temperature": 0, "stream": True,
        "store": True, "metadata": {"a": "b"}, "reasoning": None, "ttc": {"strategy": "best_of_n", "n": 2},
        "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "42"}]})
    chat = to_chat(req)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert chat.messages[2].tool_calls[0].id == "c1" and chat.messages[3].tool_call_id == "c1"
    assert chat.max_completion_tokens == 12 and chat.include_usage and chat.ttc.strategy == "best_of_n"
    assert chat.ttc.params == {"n": 2}
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    assert ResponsesRequest.model_validate({"model": "m", "input": "x", "previous_response_id": "r"}).refused()[0] \
        == "previous_response_id"


def test_chat_answer_becomes_a_response():
    req = ResponsesRequest.model_validate({"model": "m", "input": "Hi", "max_output_tokens": 5})
    chat = {"id": "chatcmpl-1", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "flops": 3.0},
            "ttc": {"strategy": "none"}}
    body = from_chat(req, chat)
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0] == {"type": "output_text", "text": "Hello", "annotations": [],
                                               "logprobs": []}
    assert body["usage"]["input_tokens"] == 7 and body["usage"]["output_tokens"] == 5 and body["ttc"]


def test_chat_chunks_become_response_events():
    stream = EventStream(ResponsesRequest.model_validate({"model": "m", "input": "Hi"}))
    frames = stream.start()
    frames += stream.chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    frames += stream.chunk({"choices": [{"index": 0, "delta": {"content": "He"}}]})
    frames += stream.chunk({"choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": "stop"}]})
    frames += stream.chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    frames += stream.finish()
    events = [orjson.loads(f.split(b"data: ", 1)[1]) for f in frames]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert events[-1]["response"]["usage"]["total_tokens"] == 5


# SmolLM2-135M-Instruct's shipped chat template (from the prepared model folder's chat_template.jinja).
SHIPPED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _render(template: str, **kw) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v: __import__("json").dumps(v, ensure_ascii=False)
    return env.from_string(template).render(**kw)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "again"}],
    [{"role": "developer", "content": "D"}, {"role": "user", "content": "q"}],
])
@pytest.mark.parametrize("generation", [True, False])
def test_tool_template_renders_like_the_shipped_one_without_tools(messages, generation):
    from service.workers.supervisor import BUNDLED_TOOL_TEMPLATE

    ours = BUNDLED_TOOL_TEMPLATE.read_text()
    assert _render(ours, messages=messages, add_generation_prompt=generation) == \
        _render(SHIPPED_TEMPLATE, messages=messages, add_generation_prompt=generation)


def test_tool_template_renders_tools_calls_and_results():
    from service.workers.supervisor import BUNDLED_TOOL_TEMPLATE

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = _render(BUNDLED_TOOL_TEMPLATE.read_text(), messages=messages, tools=tools, add_generation_prompt=True)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_streamed_tool_calls_become_function_call_items():
    stream = EventStream(ResponsesRequest.model_validate({"model": "m", "input": "Hi", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object"}}]}))
    frames = stream.start()
    frames += stream.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}}]})
    frames += stream.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]})
    frames += stream.finish()
    events = [orjson.loads(f.split(b"data: ", 1)[1]) for f in frames]
    assert [e["type"] for e in events][2:] == ["response.output_item.added", "response.function_call_arguments.done",
                                               "response.output_item.done", "response.completed"]
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["call_id"], item["name"], item["arguments"]) == ("function_call", "call_1", "f",
                                                                               '{"a": 1}')


def test_responses_usage_validates_against_the_openai_sdk_strictly():
    from openai.types.responses import ResponseUsage

    from service.api.responses_api import usage_of

    usage = usage_of({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17, "flops": 3e9,
                      "prompt_tokens_details": {"cached_tokens": 8}})
    parsed = ResponseUsage.model_validate(usage, strict=True)
    assert parsed.input_tokens_details.cached_tokens == 8 and parsed.output_tokens == 5
