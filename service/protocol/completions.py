"""OpenAI request models as clients send them. Unknown or unsupported fields are rejected (400), not ignored; known
fields sent as null mean their default (clients send them so), and the harmless OpenAI-only ones are accepted
(tools.IGNORED_FIELDS).

Kept apart from serving logic, as vLLM's OpenAI server keeps its protocol module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .strict import StrictModel
from .tools import (IGNORED_FIELDS, RefusalPart, ResponseFormat, TextPart, ToolCall, ToolChoice,
                    ToolDefinition, content_text, parse_content)
from .ttc import TTCExtension

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1



class StreamOptions(StrictModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's side-channel padding; nothing to pad here


# Message fields of assistant turns that clients echo back from earlier responses; not forwarded upstream.
ECHOED_MESSAGE_FIELDS = frozenset({"annotations", "audio", "function_call", "reasoning", "reasoning_content"})


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return parse_content(v)

    @model_validator(mode="after")
    def _shape(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        return content_text(self.content)


class SamplingFields(StrictModel):
    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        """`"n": null` means the default, as OpenAI and vLLM read it; unknown fields still fail, null or not."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extras (forwarded as they are; with a strategy only those in STRATEGY_SAMPLING_FIELDS).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    structured_outputs: dict[str, Any] | None = None
    cache_salt: str | None = None
    # Harmless OpenAI fields (IGNORED_FIELDS): accepted, never forwarded. The few that would change the answer and
    # cannot be honoured are refused with their reason by protocol_tools.refused_fields.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Test-time compute options (the openai client's extra_body): strategy and its parameters, budgets.
    ttc: TTCExtension | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extras.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or ()
        if v not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools")
        if v is not None and not isinstance(v, str) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {v.function.name!r}, which is not in tools")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(x, list) and not x for x in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    def requested_max_tokens(self) -> int:
        return self.max_tokens

    def single_text_prompt(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        if isinstance(self.prompt, list) and len(self.prompt) == 1 and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return None


# Per-token sampling controls a strategy applies to every engine call it makes (each candidate is sampled alike).
STRATEGY_SAMPLING_FIELDS = ("top_k", "min_p", "repetition_penalty", "logit_bias", "presence_penalty",
                            "frequency_penalty", "bad_words", "allowed_token_ids")
# vLLM extras that shape one whole generation or its prompt: meaningful for a pass-through call, not for the many
# partial calls of a search, so a strategy refuses them rather than silently dropping them.
PASSTHROUGH_ONLY_FIELDS = ("min_tokens", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                           "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
                           "structured_outputs", "chat_template_kwargs", "add_generation_prompt",
                           "continue_final_message", "tool_choice", "parallel_tool_calls")
# Never sent upstream: the gateway's own fields and the accepted-but-ignored OpenAI ones.
NOT_FORWARDED = frozenset({"ttc", "stream_options", "max_completion_tokens"}) | IGNORED_FIELDS
