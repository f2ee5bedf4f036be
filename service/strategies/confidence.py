"""DeepConf's confidence measures (Fu et al. 2025, arXiv 2508.15260), pure functions on the top-k log-probabilities
vLLM returns with every sampled token. best-of-N's confidence selection and adaptive sampling use them directly;
rewards/confidence.py turns them into a zero-FLOPs `Reward`. Definitions (the paper's):
- token confidence      C_i = -(1/k) * sum_j log P_i(j) over the k most likely tokens at position i
  (a peaked distribution puts the k-1 runners-up far below the winner: high C; a flat one: low C);
- group confidence      the mean C over a sliding window of `window` tokens (overlapping windows; a trace shorter than
  one window is one group);
- lowest group          min over the groups (the trace's weakest stretch; what online early stopping watches);
- bottom-10% group      mean of the lowest 10% of the groups;
- tail                  mean C over the last `tail` tokens (the final answer's stretch);
- mean                  mean C over the whole trace.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from .base import Completion

Metric = Literal["lowest_group", "bottom10", "tail", "mean"]
METRICS: tuple[str, ...] = ("lowest_group", "bottom10", "tail", "mean")
# vLLM reports -inf log-probabilities as very large negative numbers; one such entry must not dominate a mean.
_FLOOR = -100.0


def token_confidence(top: Sequence[float]) -> float:
    if not top:
        return 0.0
    return -sum(max(_FLOOR, float(v)) for v in top) / len(top)


def token_confidences(completion: Completion) -> list[float]:
    return [token_confidence(top) for top in completion.top_logprobs or []]


def group_confidences(conf: Sequence[float], window: int) -> list[float]:
    """Means of every full window of `window` consecutive tokens; one group (the whole trace) when it is shorter."""
    if not conf:
        return []
    if len(conf) <= window:
        return [sum(conf) / len(conf)]
    prefix = [0.0]
    for c in conf:
        prefix.append(prefix[-1] + c)
    return [(prefix[i + window] - prefix[i]) / window for i in range(len(conf) - window + 1)]


def trace_confidence(conf: Sequence[float], metric: str = "lowest_group", window: int = 32, tail: int = 32) -> float:
    if not conf:
        return 0.0
    if metric == "mean":
        return sum(conf) / len(conf)
    if metric == "tail":
        last = conf[-tail:]
        return sum(last) / len(last)
    groups = group_confidences(conf, window)
    if metric == "lowest_group":
        return min(groups)
    if metric == "bottom10":
        worst = sorted(groups)[: max(1, math.ceil(0.1 * len(groups)))]
        return sum(worst) / len(worst)
    raise ValueError(f"unknown confidence metric {metric!r}")


def squash(confidence: float, scale: float) -> float:
    return confidence / (confidence + scale) if confidence > 0 else 0.0


# --- online early termination (DeepConf's warm-up threshold) ---------------------------------------------------

def warmup_threshold(warmup: Sequence[float], keep_percent: float) -> float:
    """The stopping threshold from the warm-up traces' lowest group confidences: the (100 - keep_percent)th
    percentile, so about keep_percent % of traces like them would run to the end (DeepConf-low: 10, -high: 90)."""
    if not warmup:
        raise ValueError("the threshold needs at least one warm-up trace")
    ranked = sorted(warmup)
    q = (100.0 - keep_percent) / 100.0 * (len(ranked) - 1)  # linear interpolation, numpy's default
    lo = math.floor(q)
    hi = min(lo + 1, len(ranked) - 1)
    return ranked[lo] + (ranked[hi] - ranked[lo]) * (q - lo)


def first_stop(conf: Sequence[float], window: int, threshold: float) -> int | None:
    """Tokens a trace would have generated when stopped online: the first full window whose mean falls below
    `threshold` ends it (the count includes that window's last token); None when it never falls below."""
    running = 0.0
    for i, c in enumerate(conf):
        running += c
        if i >= window:
            running -= conf[i - window]
        if i >= window - 1 and running / window < threshold:
            return i + 1
    return None


class OnlineStop:
    """`first_stop` one token at a time, for a trace that is still being generated: `push` each token's confidence;
    it returns True at exactly the token where `first_stop` would end the trace (same arithmetic, same order)."""

    def __init__(self, window: int, threshold: float):
        self.window, self.threshold = window, threshold
        self.conf: list[float] = []
        self.running = 0.0

    def push(self, c: float) -> bool:
        i = len(self.conf)
        self.conf.append(c)
        self.running += c
        if i >= self.window:
            self.running -= self.conf[i - self.window]
        return i >= self.window - 1 and self.running / self.window < self.threshold


def consensus(weights: dict[str, float]) -> float:
    """DeepConf's beta: the leading answer's share of the confidence-weighted vote (adaptive sampling stops at tau)."""
    total = sum(weights.values())
    return max(weights.values()) / total if total > 0 else 0.0
