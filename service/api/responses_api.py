"""POST /v1/responses: the OpenAI Responses API on top of the chat path.

The request becomes a chat request (responses_protocol.to_chat) and goes through the same serving code as
/v1/chat/completions: limits, budgets, strategies, cache, metering and the X-TTC-* headers. The chat answer is then
rewritten as a Response object, or, for a stream, the chat chunks are rewritten as Responses events as they come.
No response is stored (`store` is accepted and answered false).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import orjson
from starlette.responses import Response, StreamingResponse

from .http import SettlingStream

from ..protocol.responses import ResponsesRequest


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    # cache_write_tokens: required by the openai SDK's strict Response model; nothing here is billed as a cache
    # write.
    usage = {"input_tokens": chat_usage.get("prompt_tokens", 0),
             "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
             "output_tokens": chat_usage.get("completion_tokens", 0),
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": chat_usage.get("total_tokens", 0)}
    if "flops" in chat_usage:
        usage["flops"] = chat_usage["flops"]
    return usage


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [text_part(text)] if status == "completed" else []}


def call_item(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"id": new_id("fc"), "type": "function_call", "status": "completed", "call_id": call.get("id") or "",
            "name": fn.get("name") or "", "arguments": fn.get("arguments") or ""}


def response_object(req: ResponsesRequest, resp_id: str, created: float, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                    finish_reason: str | None = None, ttc: dict[str, Any] | None = None) -> dict[str, Any]:
    incomplete = None
    if status == "completed" and finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    tool_choice: Any = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    body: dict[str, Any] = {
        "id": resp_id, "object": "response", "created_at": int(created), "status": status, "model": req.model,
        "output": output, "error": None, "incomplete_details": incomplete, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls is not False, "tool_choice": tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
        "text": {"format": fmt or {"type": "text"}}, "truncation": req.truncation or "disabled",
        "previous_response_id": None, "reasoning": None, "store": False, "metadata": req.metadata or {},
        "user": req.user, "usage": usage,
    }
    if ttc is not None:
        body["ttc"] = ttc
    return body


def from_chat(req: ResponsesRequest, chat: dict[str, Any], resp_id: str | None = None) -> dict[str, Any]:
    """A finished chat completion as a Response: its text as one output message, its tool calls as items."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(message_item(new_id("msg"), message.get("content") or ""))
    output += [call_item(c) for c in message.get("tool_calls") or ()]
    return response_object(req, resp_id or new_id("resp"), float(chat.get("created") or time.time()), "completed",
                           output, usage_of(chat.get("usage")), choice.get("finish_reason"), chat.get("ttc"))


class EventStream:
    """Chat completion chunks in, Responses streaming events out (each with its sequence number)."""

    def __init__(self, req: ResponsesRequest):
        self.req = req
        self.resp_id = new_id("resp")
        self.msg_id = new_id("msg")
        self.created = time.time()
        self.seq = 0
        self.text = ""
        self.opened = False
        self.finish_reason: str | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.ttc: dict[str, Any] | None = None

    def _event(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.msg_id, "output_index": 0, "content_index": 0}

    def start(self) -> list[bytes]:
        snapshot = response_object(self.req, self.resp_id, self.created, "in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _open_message(self) -> list[bytes]:
        self.opened = True
        return [self._event("response.output_item.added", output_index=0,
                            item=message_item(self.msg_id, "", "in_progress")),
                self._event("response.content_part.added", part=text_part(""), **self._where())]

    def chunk(self, data: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if data.get("usage"):
            self.usage = usage_of(data["usage"])
        if data.get("ttc"):
            self.ttc = data["ttc"]
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if not self.opened:
                    out += self._open_message()
                self.text += delta["content"]
                out.append(self._event("response.output_text.delta", delta=delta["content"], logprobs=[],
                                       **self._where()))
            for call in delta.get("tool_calls") or ():
                # Calls arrive in pieces keyed by index; they are sent whole at the end (one item each).
                acc = self.calls.setdefault(int(call.get("index", 0)), {"id": "", "function": {"name": "",
                                                                                               "arguments": ""}})
                acc["id"] = call.get("id") or acc["id"]
                fn = call.get("function") or {}
                acc["function"]["name"] += fn.get("name") or ""
                acc["function"]["arguments"] += fn.get("arguments") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return out

    def finish(self) -> list[bytes]:
        out: list[bytes] = []
        output: list[dict[str, Any]] = []
        if self.opened or not self.calls:
            if not self.opened:
                out += self._open_message()
            part = text_part(self.text)
            out += [self._event("response.output_text.done", text=self.text, logprobs=[], **self._where()),
                    self._event("response.content_part.done", part=part, **self._where())]
            item = message_item(self.msg_id, self.text)
            out.append(self._event("response.output_item.done", output_index=0, item=item))
            output.append(item)
        for _, call in sorted(self.calls.items()):
            item = call_item(call)
            index = len(output)
            out += [self._event("response.output_item.added", output_index=index, item=dict(item, status="in_progress",
                                                                                         arguments="")),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=item["arguments"], name=item["name"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
            output.append(item)
        final = response_object(self.req, self.resp_id, self.created, "completed", output, self.usage,
                                self.finish_reason, self.ttc)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, response=final))
        return out

    def error(self, err: dict[str, Any]) -> list[bytes]:
        failed = response_object(self.req, self.resp_id, self.created, "failed", [], self.usage)
        failed["error"] = {"code": err.get("code") or "server_error", "message": err.get("message") or "failed"}
        return [self._event("error", code=err.get("code"), message=err.get("message"), param=err.get("param")),
                self._event("response.failed", response=failed)]


async def translate_stream(req: ResponsesRequest, chat_events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Rewrites a chat SSE stream as Responses events; keep-alive comments pass through. Closing this generator
    closes the chat stream, so a client that goes away still aborts the upstream work."""
    events = EventStream(req)
    buffer = b""
    ended = False
    try:
        for e in events.start():
            yield e
        # Read the chat stream to its very end even after [DONE]: what follows it there (storing a cacheable
        # answer, recording the request as finished) must run as it does for a chat client.
        async for raw in chat_events:
            buffer += raw if isinstance(raw, bytes) else raw.encode()
            while b"\n\n" in buffer and not ended:
                frame, buffer = buffer.split(b"\n\n", 1)
                if frame.startswith(b":"):
                    yield frame + b"\n\n"
                    continue
                if not frame.startswith(b"data:"):
                    continue
                data = frame[5:].strip()
                if data == b"[DONE]":
                    ended = True
                    for e in events.finish():
                        yield e
                    continue
                msg = orjson.loads(data)
                if "error" in msg:
                    ended = True
                    for e in events.error(msg["error"]):
                        yield e
                    continue
                for e in events.chunk(msg):
                    yield e
    finally:
        aclose = getattr(chat_events, "aclose", None)
        if aclose is not None:
            await aclose()


def as_responses(req: ResponsesRequest, chat: Response) -> Response:
    """The chat path's HTTP response, rewritten for the Responses API (headers kept: X-TTC-*, X-Request-Id)."""
    headers = {k: v for k, v in chat.headers.items() if k.lower() not in ("content-length", "content-type")}
    if isinstance(chat, StreamingResponse):
        translated = StreamingResponse(translate_stream(req, chat.body_iterator), media_type="text/event-stream",
                                       headers=headers, background=chat.background)
        # The chat stream settles the request (quota, metrics, admission) when it ends: so must its translation.
        return chat.around(translated) if isinstance(chat, SettlingStream) else translated
    if chat.status_code != 200:
        return chat
    body = from_chat(req, orjson.loads(chat.body))
    return Response(orjson.dumps(body), media_type="application/json", headers=headers,
                    background=chat.background)
