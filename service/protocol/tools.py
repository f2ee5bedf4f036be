"""The structured parts of an OpenAI chat request: tool definitions and calls, content parts, response_format, and
the lists of fields the gateway accepts without acting on them or refuses with a reason.

Kept apart from protocol.py so the request models there stay short; every model here is strict (unknown keys 400).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .strict import StrictModel

# Function names as OpenAI accepts them.
_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


_Strict = StrictModel


class FunctionDefinition(_Strict):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(pattern=_NAME)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    # A JSON text, as the model produced it (OpenAI does not promise it parses).
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


_MEDIA_PARTS = ("image_url", "input_audio", "file", "input_image", "input_file", "video_url", "audio_url")


def parse_content(v: Any) -> str | list[TextPart | RefusalPart] | None:
    """A message's content: a string, or text/refusal parts. Media parts are refused with the reason (the served
    model reads text only) rather than with a schema error about union branches."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError("content must be a string or a list of content parts")
    parts: list[TextPart | RefusalPart] = []
    for i, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(TextPart.model_validate(part))
        elif kind == "refusal":
            parts.append(RefusalPart.model_validate(part))
        elif kind in _MEDIA_PARTS:
            raise ValueError(f"content part {i} has type {kind!r}, which is not supported: the served model reads "
                             "text only")
        else:
            raise ValueError(f"content part {i} needs a type of 'text' (got {kind!r})")
    return parts


def content_text(content: str | list[TextPart | RefusalPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


class JSONSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    # Named `schema` on the wire; `schema_` in Python because BaseModel.schema exists.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self

    @property
    def structured(self) -> bool:
        """True when the answer must be JSON (guided decoding); "text" is the default and changes nothing."""
        return self.type != "text"

    def wire(self) -> dict[str, Any]:
        """The form vLLM accepts (the schema under its wire name)."""
        return self.model_dump(exclude_none=True, by_alias=True)


# OpenAI fields that change nothing about the answer this gateway can give: accepted, not forwarded. `store` and
# `metadata` ask OpenAI to keep the completion for its dashboard; `service_tier` picks a price class; `prediction` is
# a latency optimisation whose output is the same; `reasoning_effort` and `verbosity` are hints for reasoning models.
IGNORED_FIELDS = frozenset({"store", "metadata", "service_tier", "prediction", "reasoning_effort", "verbosity",
                            "prompt_cache_key", "safety_identifier", "modalities", "audio", "web_search_options",
                            "functions", "function_call", "prompt_cache_retention"})

# Fields that would change what the answer is and that the gateway cannot honour: refused with the reason, when set
# to anything but their harmless values (checked by `refused_fields`).
_REFUSED = {
    "audio": "audio output is not supported: the served model produces text only",
    "web_search_options": "web search is not available on this gateway",
    "functions": "the deprecated `functions` parameter is not supported; send the same definitions as `tools`",
    "function_call": "the deprecated `function_call` parameter is not supported; use `tool_choice`",
}


def refused_fields(values: dict[str, Any]) -> tuple[str, str] | None:
    """The first refused field set in a request body, with why, or None."""
    for name, why in _REFUSED.items():
        if values.get(name) not in (None, [], {}):
            return name, why
    modalities = values.get("modalities")
    if modalities is not None and any(m != "text" for m in modalities):
        return "modalities", "only the text modality is supported: the served model produces text only"
    return None
