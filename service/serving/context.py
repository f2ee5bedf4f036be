"""What serving needs to know about one request besides its body."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..metering import Meter


@dataclass
class RequestContext:
    route: str  # "chat" or "completions": the shape served
    request_id: str
    tenant: str = "anonymous"
    headers: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    meter: Meter = field(default_factory=Meter)
    created: int = field(default_factory=lambda: int(time.time()))
    strategy: str = "none"
    model: str = ""
    cache_status: str = "bypass"
    first_token_s: float | None = None
    finished: bool = False
    key_hash: str = ""
    budget_flops: float | None = None
    difficulty: int | None = None
    expected_accuracy: float | None = None
    # time.monotonic() by which the request must be answered (X-TTC-Deadline-Ms), if any.
    deadline: float | None = None
    budget_exhausted: bool = False
    # Exact prompt tokens of a plain request, one per prompt (counted when a budget or a batch needs them).
    prompt_tokens: list[int] | None = None
    # The HTTP path, for metrics, when it is not the route's own (/v1/responses is served as chat).
    path: str = ""

    def mark_first_token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started

    @property
    def response_id(self) -> str:
        prefix = "chatcmpl" if self.route == "chat" else "cmpl"
        return f"{prefix}-{uuid.uuid4().hex}"
