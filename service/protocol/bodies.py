"""The OpenAI response bodies the gateway sends (chat.completion, text_completion, their stream chunks, usage) and its
own additions to them: `usage.flops` and the `ttc` object.

Every model allows extra keys, so vLLM's own fields on a forwarded answer and a strategy's extras in `ttc` travel
unchanged. `wire()` is the JSON form: a key never set is absent, a key set to null stays null (OpenAI's shape has
explicit nulls: a choice's `logprobs`, a content chunk's `finish_reason`); the keys listed in `absent_if_null` are
dropped when null instead (OpenAI omits them). serving/bodies.py builds them; nothing else does.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_validator

# vLLM-only fields that are null unless asked for; dropped so answers look like OpenAI's.
VLLM_NULL_FIELDS = ("token_ids", "prompt_token_ids", "prompt_logprobs", "routed_experts", "kv_transfer_params",
                    "prompt_text", "ec_transfer_params", "metrics", "service_tier")


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Keys dropped when null ("*": every key, extras included).
    absent_if_null: ClassVar[tuple[str, ...] | Literal["*"]] = ()
    # Keys on the wire even when left at their default (a body's `object`).
    always_sent: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        drop = cls.absent_if_null
        if drop and isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or (drop != "*" and k not in drop)}
        return data

    @model_validator(mode="after")
    def _sent(self) -> "WireModel":
        self.__pydantic_fields_set__.update(self.always_sent)
        return self

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


# ---- usage ------------------------------------------------------------------------------------------------------

class PromptTokensDetails(WireModel):
    cached_tokens: int | None = None


class Usage(WireModel):
    """OpenAI's usage plus `flops`, everything this request cost (policy and reward)."""

    absent_if_null = ("prompt_tokens_details", "completion_tokens_details")
    # Defaults only for an upstream answer without usage (it then carries `flops` alone, as it always has).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    flops: float | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


# ---- the `ttc` object -------------------------------------------------------------------------------------------

class TTCFlops(WireModel):
    policy: float
    reward: float
    total: float


class TTCTokens(WireModel):
    policy_prompt: int
    policy_cached: int
    policy_completion: int
    reward: int


class TTCCalls(WireModel):
    policy: int
    reward: int


class TTCBudget(WireModel):
    flops: float
    remaining_flops: float


class TTCInfo(WireModel):
    """What the request spent and how it was answered. Every optional key is absent rather than null; a strategy's
    own keys (e.g. `samples_reused`) are extras."""

    absent_if_null = "*"
    strategy: str
    flops: TTCFlops
    tokens: TTCTokens
    calls: TTCCalls
    # A search's result (absent on a plain request).
    params: dict[str, Any] | None = None
    reward: str | None = None
    samples: int | None = None
    steps: int | None = None
    answer: str | None = None
    score: float | None = None
    budget_exhausted: bool | None = None
    cache: str | None = None
    details: dict[str, Any] | None = None
    # The request's budget and the router's estimate, when there are any.
    budget: TTCBudget | None = None
    difficulty: int | None = None
    expected_accuracy: float | None = None


# ---- whole answers ----------------------------------------------------------------------------------------------

class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(WireModel):
    absent_if_null = VLLM_NULL_FIELDS
    index: int = 0
    message: AssistantMessage
    logprobs: Any = None
    finish_reason: str | None = None


class CompletionChoice(WireModel):
    absent_if_null = VLLM_NULL_FIELDS
    index: int = 0
    text: str
    logprobs: Any = None
    finish_reason: str | None = None


class _Body(WireModel):
    always_sent = ("object",)
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Any]
    usage: Usage | None = None
    ttc: TTCInfo | None = None


class ChatCompletion(_Body):
    absent_if_null = VLLM_NULL_FIELDS
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class TextCompletion(_Body):
    """A completions answer, and (OpenAI streams them in the same shape) a completions stream chunk."""

    absent_if_null = VLLM_NULL_FIELDS
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# ---- stream chunks ----------------------------------------------------------------------------------------------

class Delta(WireModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(WireModel):
    index: int = 0
    delta: Delta
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Body):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


# Completions chunks are text_completion objects (their final usage chunk has no choices).
CompletionChunk = TextCompletion
AnswerBody = ChatCompletion | TextCompletion
ChunkBody = ChatCompletionChunk | TextCompletion
