"""An in-memory vLLM policy worker and a gateway assembled around it, for testing `serving/` and `api/` in
milliseconds: the real Serving, PolicyClient, admission, quota, caches, metrics and FastAPI app, only the worker
pool is fake.

The fake worker tokenizes one token per character, writes a fixed answer (one token per word, so max_tokens cuts
whole words), honours n, max_tokens and streaming like vLLM's OpenAI server, and records every call it gets.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import httpx
import orjson

from service.api.app import create_app
from service.api.errors import status_of
from service.cache import SampleStore, build_cache
from service.config import Settings
from service.metering import Meter, ModelShape
from service.metrics import Metrics
from service.rewards import ArithmeticReward
from service.serving.admission import Admission
from service.serving.handler import Serving
from service.serving.quota import FlopsQuota
from service.serving.response_cache import ResponseCache
from service.workers.policy import PolicyClient
from service.workers.pool import WorkerError, WorkerUnavailable

MODEL = "tiny"
SHAPE = ModelShape(n_layer=2, d_model=64, n_heads=4, head_dim=16, n_kv_heads=4, d_ff=128, vocab=1000)
ANSWER = "2 + 2 = 4\nThe answer is 4."


def render_chat(messages: list[dict[str, Any]]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def words(text: str) -> list[str]:
    out, word = [], ""
    for c in text:
        word += c
        if c in " \n":
            out.append(word)
            word = ""
    return out + ([word] if word else [])


class FakeWorkerPool:
    """WorkerPool's surface (post_json, stream, served_name) over an in-memory model."""

    name = "policy"

    def __init__(self, answer: Callable[[str], str] = lambda prompt: ANSWER):
        self.served_name = MODEL
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # Set to make generation calls fail: an exception instance, raised until cleared.
        self.fail: Exception | None = None
        # Set to make the stream fail after this many content chunks.
        self.fail_stream_after: int | None = None
        # Seconds each generation call takes (for deadline and overload tests).
        self.delay_s = 0.0
        self.ready = True
        # DeepConf log-probabilities when a call asks for them: token confidence C of token t of the s-th sample this
        # worker generated (top-k all equal to -C, so C is exact), and how many tokens each stream chunk carries.
        self.confidence: Callable[[int, int], float] = lambda sample, token: 8.0
        self.chunk_tokens = 1
        # Chunks a stream had already delivered, unread, when its reader stopped (what pending() hands out).
        self.prefetch = 0
        self.sampled = 0
        # Per stream: tokens sent, and whether the client read it to the end (False: it closed it early).
        self.streams: list[dict[str, Any]] = []

    def generations(self) -> list[dict[str, Any]]:
        return [p for path, p in self.calls if path.startswith("/v1/")]

    async def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, payload))
        if path == "/tokenize":
            text = payload["prompt"] if "prompt" in payload else render_chat(payload["messages"])
            tokens = [ord(c) for c in text]
            return {"count": len(tokens), "tokens": tokens, "max_model_len": 8192}
        if path == "/detokenize":
            return {"prompt": "".join(chr(t) for t in payload["tokens"])}
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        if path == "/v1/completions":
            return self._completions(payload)
        if path == "/v1/chat/completions":
            return self._chat(payload)
        raise AssertionError(f"unexpected path {path}")

    def _write(self, prompt: str, max_tokens: int, stop: list[str] | None = None) -> tuple[str, int, str, str | None]:
        """(text, tokens, finish_reason, stop_reason): the rest of the answer after what the prompt already holds
        of it (step searches send partial answers), cut at the first stop string (excluded, as vLLM does)."""
        full = self.answer(prompt)
        partial = prompt.rsplit("assistant\n", 1)[-1] if "assistant\n" in prompt else ""
        rest = full[len(partial):] if partial and full.startswith(partial) else full
        stop_reason = None
        cuts = [(rest.find(s), s) for s in stop or () if s and s in rest]
        if cuts:
            at, stop_reason = min(cuts)
            rest = rest[:at]
        answer = words(rest)
        if len(answer) > max_tokens:
            return "".join(answer[:max_tokens]), max_tokens, "length", None
        return rest, len(answer), "stop", stop_reason

    def _completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
        n = int(payload.get("n") or 1)
        choices, prompt_total, completion_total = [], 0, 0
        for p, prompt in enumerate(prompts):
            prompt_ids = [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
            prompt_total += len(prompt_ids)
            for j in range(n):
                text, count, finish, stop_reason = self._write(prompt if isinstance(prompt, str) else "",
                                                               payload["max_tokens"], payload.get("stop"))
                completion_total += count
                choices.append({"index": p * n + j, "text": text, "finish_reason": finish,
                                "logprobs": self._logprobs(text, payload.get("logprobs")),
                                "token_ids": list(range(count)), "prompt_token_ids": prompt_ids,
                                "stop_reason": stop_reason})
        return {"id": "cmpl-up", "object": "text_completion", "created": int(time.time()), "model": MODEL,
                "choices": choices, "usage": {"prompt_tokens": prompt_total, "completion_tokens": completion_total,
                                              "total_tokens": prompt_total + completion_total}}

    def _logprobs(self, text: str, k: int | None) -> dict[str, Any] | None:
        sample, self.sampled = self.sampled, self.sampled + 1
        if not k:
            return None
        pieces = words(text)
        conf = [self.confidence(sample, t) for t in range(len(pieces))]
        return {"tokens": pieces, "token_logprobs": [-c for c in conf],
                "top_logprobs": [{f"t{j}": -c for j in range(k)} for c in conf],
                "text_offset": [sum(len(x) for x in pieces[:t]) for t in range(len(pieces))]}

    def _chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompt = render_chat(payload["messages"])
        n = int(payload.get("n") or 1)
        choices, completion_total = [], 0
        for j in range(n):
            text, count, finish, _ = self._write(prompt, payload["max_tokens"], payload.get("stop"))
            completion_total += count
            choices.append({"index": j, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": finish})
        return {"id": "chatcmpl-up", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
                "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_total,
                                              "total_tokens": len(prompt) + completion_total}}

    @asynccontextmanager
    async def stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator["_Events"]:
        body = await self.post_json(path, payload)
        chat = path == "/v1/chat/completions"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield orjson.dumps(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}])).decode()
            for i in range(0, len(pieces), step):
                if self.fail_stream_after is not None and i >= self.fail_stream_after:
                    raise WorkerUnavailable("policy", "connection reset")
                if i < record["sent"]:
                    continue  # already handed out by pending()
                record["sent"] = min(i + step, len(pieces))
                yield chunk_at(i)
            last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
            yield orjson.dumps(dict(base, choices=[dict(last, finish_reason=choice["finish_reason"])])).decode()
            yield orjson.dumps(dict(base, choices=[], usage=body["usage"])).decode()
            record["finished"] = True
            yield "[DONE]"

        base = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
                "created": body["created"], "model": MODEL}
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        lp = choice.get("logprobs")
        pieces = words(text)
        step = self.chunk_tokens if lp else 1

        def chunk_at(i: int) -> str:
            word = "".join(pieces[i:i + step])
            piece = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            if lp:  # as vLLM streams completions with logprobs and return_token_ids
                piece.update(logprobs={key: lp[key][i:i + step] for key in lp},
                             token_ids=list(range(i, min(i + step, len(pieces)))))
                if i == 0:
                    piece["prompt_token_ids"] = choice["prompt_token_ids"]
            return orjson.dumps(dict(base, choices=[dict(piece, finish_reason=None)])).decode()

        def pending() -> list[str]:
            """The next `prefetch` chunks, as if they had arrived unread (WorkerPool's SSEEvents.pending)."""
            out = []
            for i in range(record["sent"], min(len(pieces), record["sent"] + self.prefetch * step), step):
                out.append(chunk_at(i))
                record["sent"] = min(i + step, len(pieces))
            return out

        record: dict[str, Any] = {"sent": 0, "finished": False, "payload": payload}
        self.streams.append(record)
        yield _Events(events(), pending)


class _Events:
    def __init__(self, events: AsyncIterator[str], pending: Callable[[], list[str]]):
        self._events, self.pending = events, pending

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events


def worker_error(status: int, message: str = "bad request") -> WorkerError:
    return WorkerError("policy", status, {"error": {"message": message}})


@dataclass
class FakeRuntime:
    """What create_app needs of gateway.Gateway, assembled around a FakeWorkerPool."""

    settings: Settings
    pool: FakeWorkerPool = field(default_factory=FakeWorkerPool)
    policy_table: Any = None

    def __post_init__(self) -> None:
        s = self.settings
        self.metrics = Metrics()
        self.cache = build_cache(None, memory_max_entries=1000)
        self.quota = FlopsQuota(self.cache)
        self.admission = Admission(s.max_concurrency, s.max_queue, s.queue_timeout_s, s.retry_after_s)
        self.policy = PolicyClient(self.pool, SHAPE)  # type: ignore[arg-type]
        self.draining = False
        self.started_at = int(time.time())
        self.pools = [self.pool]
        self.serving = Serving(s, self.policy, self.admission, self.quota, self.metrics,
                               ResponseCache(self.cache, s.cache_response_ttl_s), SampleStore(self.cache, 64),
                               self.reward_for, self.policy_table, status_of, draining=lambda: self.draining)

    def reward_for(self, meter: Meter, tenant: str) -> ArithmeticReward:
        return ArithmeticReward()

    @property
    def ready(self) -> bool:
        return not self.draining

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def client(self) -> httpx.AsyncClient:
        app = create_app(self.settings, self)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"policy": {"urls": ["http://127.0.0.1:1"], "served_name": MODEL},
                            "reward_backend": "arith", "redis_url": ""}
    base.update(overrides)
    return Settings(**base)


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ([DONE] as the string)."""
    out: list[Any] = []
    for frame in text.split("\n\n"):
        if frame.startswith("data: "):
            data = frame[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out
