"""Server-sent events in OpenAI's framing: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""

from __future__ import annotations

from typing import Any

import orjson

from ..protocol.bodies import WireModel

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def event(payload: WireModel | dict[str, Any] | bytes) -> bytes:
    if isinstance(payload, WireModel):
        payload = payload.wire()
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def error_event(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    return event({"error": {"message": message, "type": type_, "param": None, "code": code}})
