"""The OpenAI Responses API request (POST /v1/responses) and its translation into a chat request.

The gateway serves a Responses call through the chat path (one serving path, one set of limits, budgets and
strategies): `to_chat` turns the request into a ChatCompletionRequest; responses_api.py turns the chat answer back.
Input items are messages (text parts) and, for tool use, function calls and their outputs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .completions import ChatCompletionRequest, StrictModel
from .ttc import TTCExtension

_Strict = StrictModel  # the chat protocol's strict base: unknown fields are a 400 here too


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem
_ITEMS: dict[str, type[BaseModel]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                      "function_call_output": FunctionCallOutputItem}


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedTool(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None  # a hint for reasoning models


# Responses fields that need state the gateway does not keep (it stores no responses or conversations).
_STATEFUL = {
    "previous_response_id": "this gateway stores no responses, so previous_response_id cannot be continued; send "
                            "the whole conversation as input",
    "conversation": "this gateway stores no conversations; send the whole conversation as input",
    "prompt": "stored prompt templates are not available on this gateway; send the text as input",
}


class ResponsesRequest(_Strict):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(None, max_length=256)
    # Accepted and ignored (nothing is stored, no reasoning model, one service tier).
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    ttc: TTCExtension | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        if not isinstance(v, list):
            return v
        items = []
        for i, item in enumerate(v):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind not in _ITEMS:
                raise ValueError(f"input item {i} has type {kind!r}; supported: {', '.join(_ITEMS)}")
            items.append(_ITEMS[kind].model_validate(item))
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        for i, tool in enumerate(v or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tool {i} has type {kind!r}; only function tools are supported (no hosted tools)")
        return v

    def refused(self) -> tuple[str, str] | None:
        """The first field that cannot be honoured, with why (a 400 naming it)."""
        for name, why in _STATEFUL.items():
            if getattr(self, name) is not None:
                return name, why
        if self.background:
            return "background", "background responses need stored responses, which this gateway does not keep"
        return None


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """Instructions first (as the system message), then the input items as chat messages; consecutive function
    calls become one assistant turn with several tool_calls."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for item in req.input:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers this Responses request (validated like any chat request)."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    for src, dst in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("user", "user"), ("parallel_tool_calls", "parallel_tool_calls"),
                     ("ttc", "ttc")):
        value = getattr(req, src)
        if value is not None:
            body[dst] = value
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if isinstance(req.tool_choice, NamedTool):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None and (req.tools or req.tool_choice == "none"):
        body["tool_choice"] = req.tool_choice
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    return ChatCompletionRequest.model_validate(body)

