"""The policy model behind the `Policy` interface, on a pool of vLLM OpenAI servers.

`PolicyClient` is shared by all requests (one pool, one aiohttp session). `MeteredPolicy` is its per-request view that
strategies receive: every call it makes is metered into that request's `Meter` from the token counts vLLM returns.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Sequence

import orjson

from ..metering import Meter, ModelShape
from ..strategies.base import Completion, SamplingParams, StopCheck
from .pool import WorkerPool


# Chat fields that change what the chat template renders (and so the prompt's tokens).
_TEMPLATE_FIELDS = ("messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                    "continue_final_message")
_COUNT_CACHE_SIZE = 8192
# Tokens a stream may have cost beyond those the gateway received when it closed it (the rest of the chunk that
# stopped it and the chunks already buffered count as received): the ones still in the socket and the ones decoded
# before vLLM noticed the closed connection and aborted. An aborted sample is metered received + this (at most
# max_tokens). Measured against vllm:generation_tokens_total on the bundled worker: see the README (DeepConf online).
ABORT_SLACK_TOKENS = 4


def _top_logprobs(lp: dict[str, Any], k: int) -> dict[str, Any]:
    """Completion fields from vLLM's completions `logprobs` block: the k largest values per position (vLLM adds the
    sampled token when it is outside the top k; it is not part of the top k) and character offsets into the text."""
    tops = [sorted((float(v) for v in (d or {}).values()), reverse=True)[:k] for d in lp.get("top_logprobs") or []]
    offsets = [int(o) for o in lp.get("text_offset") or []]
    if offsets:
        offsets = [o - offsets[0] for o in offsets]  # relative to the start of this completion's text
    return {"top_logprobs": tops, "token_offsets": offsets or None}


class _Stream:
    """One stoppable sample as it arrives: its tokens' top-k log-probabilities, text and what to meter."""

    def __init__(self, k: int):
        self.k = k
        self.tops: list[list[float]] = []
        self.offsets: list[int] = []
        self.pieces: list[str] = []  # token strings
        self.text: list[str] = []  # streamed text deltas
        self.received = 0
        self.prompt_tokens: int | None = None
        self.finish: str | None = None
        self.stop_reason: str | None = None
        self.stopped_at: int | None = None
        self.usage: dict[str, Any] | None = None

    def take(self, choice: dict[str, Any], i: int, should_stop: StopCheck) -> None:
        if choice.get("prompt_token_ids"):
            self.prompt_tokens = len(choice["prompt_token_ids"])
        lp = choice.get("logprobs") or {}
        ids = choice.get("token_ids")
        self.received += len(ids) if ids is not None else len(lp.get("tokens") or ())
        self.text.append(choice.get("text") or "")
        for top, offset, piece in zip(lp.get("top_logprobs") or [], lp.get("text_offset") or [],
                                      lp.get("tokens") or []):
            self.tops.append(sorted((float(v) for v in (top or {}).values()), reverse=True)[: self.k])
            self.offsets.append(int(offset))
            self.pieces.append(piece)
            if self.stopped_at is None and should_stop(i, self.tops[-1]):
                self.stopped_at = len(self.tops)
                break
        self.finish = choice.get("finish_reason") or self.finish
        reason = choice.get("stop_reason")
        self.stop_reason = reason if isinstance(reason, str) else self.stop_reason

    def count_pending(self, events: Any) -> None:
        """Tokens the worker had already sent when the sample was stopped, read or not: they were generated."""
        for data in getattr(events, "pending", list)():
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids")
                tokens = ids if ids is not None else (choice.get("logprobs") or {}).get("tokens") or ()
                self.received += len(tokens)

    def completion(self, spent: int) -> Completion:
        at = self.stopped_at
        offsets = [o - self.offsets[0] for o in self.offsets] if self.offsets else None
        if at is None:
            return Completion("".join(self.text), self.finish or "abort", self.received, self.stop_reason,
                              top_logprobs=self.tops, token_offsets=offsets,
                              engine_tokens=spent if spent > self.received else None)
        return Completion("".join(self.pieces[:at]), "abort", at, None, top_logprobs=self.tops[:at],
                          token_offsets=offsets[:at] if offsets else None, engine_tokens=spent)


class PolicyClient:
    def __init__(self, pool: WorkerPool, shape: ModelShape, block_size: int | None = None):
        self.pool = pool
        self.shape = shape
        # The workers' KV block size (None: unknown). It bounds what an n > 1 request recomputes: vLLM fans it out
        # into n engine requests, and each one after the first reuses the prompt's whole blocks only.
        self.block_size = block_size
        # Exact prompt token counts from the worker's tokenizer (text -> tokens), shared by all requests.
        self._counts: OrderedDict[str, int] = OrderedDict()

    @property
    def model(self) -> str:
        return self.pool.served_name

    async def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Apply the worker's own chat template (exactly what vLLM's chat endpoint would feed the model)."""
        tok = await self.pool.post_json("/tokenize", {"model": self.model, "messages": messages,
                                                      "add_generation_prompt": True})
        text = await self.pool.post_json("/detokenize", {"model": self.model, "tokens": tok["tokens"]})
        return text["prompt"]

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Exact token counts of completion prompts, as the worker tokenizes them (special tokens included)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._counts]
        if missing:
            counts = await asyncio.gather(*(self.pool.post_json("/tokenize", {"model": self.model, "prompt": t})
                                            for t in missing))
            for text, body in zip(missing, counts):
                self._remember(text, int(body["count"]))
        return [self._counts[t] for t in texts]

    async def count_chat_tokens(self, payload: dict[str, Any]) -> int:
        """Exact prompt tokens of a chat request: the worker renders its own chat template (tools included)."""
        body = {k: payload[k] for k in _TEMPLATE_FIELDS if payload.get(k) is not None}
        body.setdefault("add_generation_prompt", True)
        return int((await self.pool.post_json("/tokenize", {"model": self.model, **body}))["count"])

    def _remember(self, text: str, count: int) -> None:
        self._counts[text] = count
        self._counts.move_to_end(text)
        while len(self._counts) > _COUNT_CACHE_SIZE:
            self._counts.popitem(last=False)

    def prompt_tokens_bound(self, text: str) -> int:
        """The exact count once `count_tokens` has seen the text; before that an upper bound: a byte-level
        tokenizer never makes more tokens than UTF-8 bytes (plus the special tokens it adds)."""
        count = self._counts.get(text)
        return count if count is not None else len(text.encode("utf-8", "surrogatepass")) + 2

    def meter_usage(self, meter: Meter, usage: dict[str, Any] | None, n: int,
                    prompt_lengths: Sequence[int] | None = None) -> float:
        """Meter one pass-through response from its usage block; returns the FLOPs added.

        A batch of prompts is metered prompt by prompt (`prompt_lengths`, when counted), not as one long prompt.
        """
        usage = usage or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        lengths = list(prompt_lengths) if prompt_lengths and sum(prompt_lengths) == prompt else [prompt]
        n = max(1, n)
        sequences = n * len(lengths)
        # Per-choice lengths are not in usage; an even split only moves the small attention term.
        shares = [completion // sequences + (1 if i < completion % sequences else 0) for i in range(sequences)]
        flops = 0.0
        for i, plen in enumerate(lengths):
            plen_cached = round(cached * plen / prompt) if prompt else 0
            flops += self.shape.generation_flops(plen, plen_cached, shares[i * n:(i + 1) * n])
        meter.add_policy(flops, prompt, cached, completion)
        return flops


class MeteredPolicy:
    """Implements strategies.base.Policy for one request."""

    def __init__(self, client: PolicyClient, meter: Meter, extra_body: dict[str, Any] | None = None):
        self.client = client
        self.meter = meter
        self.extra_body = extra_body or {}

    def estimate_flops(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> float:
        shape = self.client.shape
        block = self.client.block_size
        total = 0.0
        for p in prompts:
            tokens = self.client.prompt_tokens_bound(p)
            total += shape.generation_flops(tokens, 0, [params.max_tokens] * n)
            # Each of the other n - 1 samples recomputes at most the prompt's last partial block.
            tail = tokens if block is None else min(tokens, block)
            total += (n - 1) * shape.forward_flops(tail, tokens - tail)
        return total

    async def count_prompt_tokens(self, prompts: Sequence[str]) -> None:
        """Makes `estimate_flops` exact for these prompts (the budgeted calls ask before every engine call)."""
        await self.client.count_tokens(prompts)

    async def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        return await self.generate_multi(prompts, params, [n] * len(prompts))

    async def generate_multi(self, prompts: Sequence[str], params: SamplingParams,
                             ns: Sequence[int]) -> list[list[Completion]]:
        """Several prompts with their own sample counts. vLLM takes one `n` per request, so prompts are grouped by
        n and the groups sent concurrently; each group is one batched request (continuous batching merges them)."""
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(ns):
            if k > 0:
                groups.setdefault(k, []).append(i)
        results: list[list[Completion]] = [[] for _ in prompts]

        async def run(k: int, idx: list[int]) -> None:
            outs = await self._request([prompts[i] for i in idx], params, k)
            for i, out in zip(idx, outs):
                results[i] = out

        await asyncio.gather(*(run(k, idx) for k, idx in groups.items()))
        return results

    async def generate_stoppable(self, prompt: str, params: SamplingParams, n: int,
                                 should_stop: StopCheck) -> list[Completion]:
        """Policy.generate_stoppable: n concurrent streamed requests (continuous batching runs them together)."""
        async with asyncio.TaskGroup() as group:  # one failure cancels the others (each meters what it generated)
            tasks = [group.create_task(self._stoppable(prompt, params, i, should_stop)) for i in range(n)]
        return [t.result() for t in tasks]

    async def _stoppable(self, prompt: str, params: SamplingParams, i: int, should_stop: StopCheck) -> Completion:
        """One streamed request; leaving the stream early closes its connection, which aborts it in vLLM."""
        client = self.client
        payload: dict[str, Any] = {
            "model": client.model, "prompt": prompt, "n": 1, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "return_token_ids": True,
            "skip_special_tokens": True, "logprobs": max(1, params.top_logprobs), "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = (params.seed + i) % (2**63)  # as vLLM seeds the i-th child of one n>1 request
        payload.update(self.extra_body)
        state, opened = _Stream(max(1, params.top_logprobs)), False
        try:
            async with client.pool.stream("/v1/completions", payload) as events:
                opened = True
                async for data in events:
                    if data == "[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if chunk.get("usage") and not chunk.get("choices"):
                        state.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        state.take(choice, i, should_stop)
                    if state.stopped_at is not None:
                        state.count_pending(events)
                        break
        finally:
            # Metered on every exit (stopped, finished, broken, cancelled): never less than what was generated.
            spent = self._meter_stream(state, prompt, params.max_tokens) if opened else 0
        return state.completion(spent)

    def _meter_stream(self, state: _Stream, prompt: str, max_tokens: int) -> int:
        """Meters one streamed sample; returns the completion tokens metered. A stream that ended normally carries
        vLLM's usage; one that did not is metered as received + ABORT_SLACK_TOKENS with its prompt uncached."""
        usage = state.usage
        if usage is not None and state.stopped_at is None:
            completion = max(state.received, int(usage.get("completion_tokens") or 0))
            plen = int(usage.get("prompt_tokens") or 0) or state.prompt_tokens or 0
            cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        else:
            completion = min(max_tokens, state.received + ABORT_SLACK_TOKENS)
            plen = state.prompt_tokens or self.client.prompt_tokens_bound(prompt)
            cached = 0  # unknown without the final usage: the upper bound
        self.meter.add_policy(self.client.shape.generation_flops(plen, cached, [completion]), plen, cached,
                              completion)
        return completion

    async def _request(self, prompts: list[str], params: SamplingParams, n: int) -> list[list[Completion]]:
        """One worker request per prompt, sent together (continuous batching merges them on the worker). Not one
        request with a list of prompts: vLLM 0.32 then reports the cached tokens of the last prompt only, which made
        the meter charge a search round's shared prefixes as if they were computed (measured: 3x the prefill the
        worker's prefix-cache counters show for REBASE N = 16)."""
        if len(prompts) == 1:
            return await self._request_one(prompts[0], params, n)
        outs = await asyncio.gather(*(self._request_one(p, params, n) for p in prompts))
        return [out[0] for out in outs]

    async def _request_one(self, prompt: str, params: SamplingParams, n: int) -> list[list[Completion]]:
        prompts = [prompt]
        payload: dict[str, Any] = {
            "model": self.client.model, "prompt": prompts, "n": n, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.logprobs or params.top_logprobs:
            payload["logprobs"] = params.top_logprobs
        payload.update(self.extra_body)
        body = await self.client.pool.post_json("/v1/completions", payload)
        out: list[list[Completion]] = [[] for _ in prompts]
        prompt_lens = [0] * len(prompts)
        for choice in body["choices"]:
            p, _ = divmod(int(choice["index"]), n)
            token_ids = choice.get("token_ids") or []
            prompt_lens[p] = len(choice.get("prompt_token_ids") or []) or prompt_lens[p]
            lp = choice.get("logprobs") or {}
            stop_reason = choice.get("stop_reason")
            out[p].append(Completion(
                text=choice.get("text") or "",
                finish_reason=choice.get("finish_reason") or "stop",
                token_count=len(token_ids),
                stop_reason=stop_reason if isinstance(stop_reason, str) else None,
                token_logprobs=lp.get("token_logprobs") if lp else None,
                **(_top_logprobs(lp, params.top_logprobs) if params.top_logprobs and lp else {}),
            ))
        self._meter(body.get("usage") or {}, prompts, prompt_lens, out)
        return out

    def _meter(self, usage: dict[str, Any], prompts: list[str], prompt_lens: list[int],
               out: list[list[Completion]]) -> None:
        """One prompt's request. vLLM runs its n samples as n engine requests, each prefilling the prompt less its
        cached prefix (the `cached_tokens` vLLM reports is one sample's); so prompt and cached tokens are counted
        per sample, as the worker's own prompt_tokens_total / prefix_cache_hits_total counters count them."""
        shape = self.client.shape
        plen = prompt_lens[0] or int(usage.get("prompt_tokens") or 0)
        cached = min(plen, int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0))
        # The samples after the first find at least the prompt's whole blocks cached (they are cached as the first
        # sample is scheduled, vLLM never reuses the last prompt token); this also keeps the charge within
        # estimate_flops' bound.
        block = self.client.block_size
        child_cached = max(cached, (plen - 1) // block * block) if block and plen else cached
        comps = out[0]
        flops, cached_total = 0.0, 0
        for k, c in enumerate(comps):
            hit = cached if k == 0 else child_cached
            flops += shape.generation_flops(plen, hit, [c.token_count])
            cached_total += hit
        completion = sum(c.token_count for c in comps)
        self.meter.add_policy(flops, plen * max(1, len(comps)), cached_total, completion)

