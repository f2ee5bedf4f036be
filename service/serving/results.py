"""What serving hands back for one request, without HTTP: a whole answer, a stream of SSE frames, or nothing (the
client left). `api/` turns them into HTTP responses (status, media type, X-TTC-* headers from the request context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from ..protocol.bodies import AnswerBody


@dataclass
class Answer:
    """A complete OpenAI body (chat.completion or text_completion); `body.wire()` is its JSON."""

    body: AnswerBody


@dataclass
class Stream:
    """SSE frames (`data: {chunk}`, keep-alive comments, `data: [DONE]`). `on_close` settles the request (quota,
    metrics, admission): whoever sends the frames awaits it once, whether the stream was read to its end or
    abandoned."""

    events: AsyncIterator[bytes]
    on_close: Callable[[], Awaitable[None]] | None = None


@dataclass
class ClientGone:
    """The client disconnected before the answer was ready; nothing is sent."""


Result = Answer | Stream | ClientGone
