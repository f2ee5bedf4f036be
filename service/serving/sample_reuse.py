"""Incremental sample reuse for best-of-N: samples already drawn for the same (tenant, prompt, model, sampling
parameters) are reused, and only the missing ones are generated. A request for N = 32 after one for N = 16 costs 16
new samples; the reused ones cost no FLOPs. Unseeded requests only: a seed promises its own reproducible draws."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..cache import SampleStore, samples_key
from ..strategies.base import Completion, SamplingParams, StopCheck
from ..workers.policy import MeteredPolicy


class SampleReusingPolicy:
    """Wraps a request's MeteredPolicy; single-prompt sampled calls go through the tenant's sample pool."""

    def __init__(self, inner: MeteredPolicy, store: SampleStore, tenant: str, ttl_s: float,
                 read: bool = True, write: bool = True):
        self.inner = inner
        self.store = store
        self.tenant = tenant
        self.ttl_s = ttl_s
        self.read, self.write = read, write
        self.reused = 0

    def estimate_flops(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> float:
        return self.inner.estimate_flops(prompts, params, n)

    async def count_prompt_tokens(self, prompts: Sequence[str]) -> None:
        await self.inner.count_prompt_tokens(prompts)

    async def generate_multi(self, prompts: Sequence[str], params: SamplingParams,
                             ns: Sequence[int]) -> list[list[Completion]]:
        return await self.inner.generate_multi(prompts, params, ns)

    async def generate_stoppable(self, prompt: str, params: SamplingParams, n: int,
                                 should_stop: StopCheck) -> list[Completion]:
        """Never pooled: these samples were stopped against this request's own threshold (an aborted one is a
        fragment), and an unseeded request's warm-up may already have come from the pool."""
        return await self.inner.generate_stoppable(prompt, params, n, should_stop)

    async def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        if len(prompts) != 1 or params.seed is not None or params.temperature == 0:
            return await self.inner.generate(prompts, params, n)
        # The request's extras (guided decoding, top_k, ...) shape the samples too: they are part of the pool's key.
        key = samples_key(self.tenant, {"model": self.inner.client.model, "prompt": prompts[0],
                                        **{f.name: getattr(params, f.name) for f in dataclasses.fields(params)},
                                        **({"extra": self.inner.extra_body} if self.inner.extra_body else {})})
        pooled = [Completion(**s) for s in await self.store.get_samples(key, n)] if self.read else []
        missing = n - len(pooled)
        fresh = (await self.inner.generate(prompts, params, missing))[0] if missing > 0 else []
        if fresh and self.write:
            await self.store.add_samples(key, [dataclasses.asdict(c) for c in fresh], self.ttl_s)
        self.reused += len(pooled)
        return [pooled + fresh]
