"""The strict base of every request model: unknown fields are refused (400, never ignored), and so is text that
cannot be encoded."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# JSON may escape a lone UTF-16 surrogate ("\ud800"); Python decodes it into a str that no UTF-8 encoder (orjson on
# the way to the worker, the cache key, the SSE stream) accepts. Refused at the edge, naming the field.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in `value` (strings, lists, dict keys and values) a lone surrogate sits, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return f"{path}.{key!a}" if path else repr(key)
            found = lone_surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    return None


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if isinstance(value, (str, list, dict)):
            where = lone_surrogate_path(value)
            if where is not None:
                inner = f" (at {where})" if where else ""
                raise ValueError(f"text must be valid Unicode: a lone UTF-16 surrogate{inner} cannot be encoded")
        return value
