"""The compute-optimal policy table (Snell et al. A1): per (difficulty bin, FLOPs budget), which strategy to run.

JSON, versioned:

    {"format_version": 1, "created": "...", "models": {"policy": ..., "reward_head": ...},
     "reward_backend": "prm*arith", "estimator": "probe" | "prompt" | "hidden",
     "probe": {"k": 4, "temperature": 0.8, "max_tokens": 96},
     "generation_flops": {...}, "budgets": [{"generations": 1, "flops": ...}, ...],
     "bins": {"statistic": "probe_mean_last_score", "cuts": [c1, c2, c3, c4]},
     "prompt_model": {...},                      # the no-decoding estimator (difficulty.PromptDifficultyModel)
     "hidden_head": {"path": "difficulty_head_smollm2.npz", "version": "..."},  # estimator "hidden": one prefill
     "entries": [{"bin", "budget_generations", "budget_flops", "strategy", "params", "expected_accuracy",
                  "mean_flops", "n_problems"}, ...],
     "calibration": {"problem_ids": [...], ...}}

Bins: 1 = easiest (highest probe score) ... 5 = hardest, as in Snell's `5 - sum(stat >= c for c in cuts)`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..strategies.base import Problem

FORMAT_VERSION = 1
N_BINS = 5


@dataclass(frozen=True)
class Choice:
    strategy: str
    params: dict[str, Any]
    expected_accuracy: float
    expected_flops: float
    # The calibrated budget this entry belongs to, and whether the asked budget was below every calibrated one.
    budget_flops: float = 0.0
    below_all_budgets: bool = False


@dataclass
class PolicyTable:
    cuts: list[float]
    entries: list[dict[str, Any]]
    budgets: list[dict[str, Any]] = field(default_factory=list)
    reward_backend: str = "prm*arith"
    estimator: str = "probe"
    models: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=lambda: {"k": 4, "temperature": Problem.temperature,
                                                            "max_tokens": 96})
    prompt_model: dict[str, Any] | None = None
    # estimator "hidden": the zero-decode head (router.hidden_difficulty), a path relative to the table's folder.
    hidden_head: dict[str, Any] | None = None
    generation_flops: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION

    # ---- difficulty bins -------------------------------------------------------------------------------------
    def bin_of(self, statistic: float) -> int:
        """1 (easiest: the statistic is at or above every cut) .. 5 (hardest: below every cut)."""
        return N_BINS - sum(statistic >= c for c in self.cuts)

    # ---- lookup ------------------------------------------------------------------------------------------------
    def lookup(self, bin: int, budget_flops: float | None) -> Choice | None:
        """The entry of `bin` for the largest calibrated budget <= budget_flops (None budget: the largest).

        When the budget is below every calibrated budget, the cheapest entry comes back with below_all_budgets=True:
        the caller enforces the budget (strategies are anytime and shrink to what fits). None only when the table
        has no entry for the bin at all.
        """
        rows = sorted((e for e in self.entries if int(e["bin"]) == int(bin)), key=lambda e: e["budget_flops"])
        if not rows:
            return None
        fitting = rows if budget_flops is None else [e for e in rows if e["budget_flops"] <= budget_flops]
        row, below = (fitting[-1], False) if fitting else (rows[0], True)
        return Choice(row["strategy"], dict(row["params"]), float(row["expected_accuracy"]),
                      float(row["mean_flops"]), float(row["budget_flops"]), below)

    # ---- persistence ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "models": self.models,
            "reward_backend": self.reward_backend,
            "estimator": self.estimator,
            "probe": self.probe,
            "generation_flops": self.generation_flops,
            "budgets": self.budgets,
            "bins": {"statistic": "probe_mean_last_score", "cuts": self.cuts},
            "prompt_model": self.prompt_model,
            **({"hidden_head": self.hidden_head} if self.hidden_head else {}),
            "entries": self.entries,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PolicyTable":
        version = int(d.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise ValueError(f"policy table format_version {version}, this code reads {FORMAT_VERSION}")
        cuts = [float(c) for c in d["bins"]["cuts"]]
        if len(cuts) != N_BINS - 1 or sorted(cuts) != cuts:
            raise ValueError(f"bins.cuts must be {N_BINS - 1} non-decreasing numbers, got {cuts}")
        return cls(cuts=cuts, entries=list(d["entries"]), budgets=list(d.get("budgets", [])),
                   reward_backend=d.get("reward_backend", "prm*arith"), estimator=d.get("estimator", "probe"),
                   models=dict(d.get("models", {})), probe=dict(d.get("probe", {})),
                   prompt_model=d.get("prompt_model"), hidden_head=d.get("hidden_head"),
                   generation_flops=dict(d.get("generation_flops", {})),
                   calibration=dict(d.get("calibration", {})), created=d.get("created", ""), format_version=version)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)


MIDDLE_BIN = 3  # the bin when a table has neither a usable probe nor a prompt model


def uses_probe(estimator: str, have_reward: bool, probe_fits: bool) -> bool:
    """The routing rule's first half: the probe runs only when the table's estimator is the probe, a reward can
    score its samples, and its worst case fits the budget; otherwise the zero-FLOPs prompt estimator decides."""
    return estimator == "probe" and have_reward and probe_fits


def choose(table: PolicyTable, budget_flops: float | None, probe_bin: int | None,
           prompt_bin: int | None, hidden_bin: int | None = None) -> tuple[str, int, Choice]:
    """The routing rule's second half, the same live (router/difficulty.run_auto) and in replay (offline/fit.route,
    offline/evaluate): the probe's bin when it ran, else the zero-decode head's when it ran, else the prompt
    estimator's (the middle bin without a prompt model), then the table's entry for the request's budget (the
    estimate's cost is paid from it, and the chosen strategy shrinks to what remains).
    Returns (estimator used, bin, choice)."""
    if probe_bin is not None:
        estimator, bin_ = "probe", probe_bin
    elif hidden_bin is not None:
        estimator, bin_ = "hidden", hidden_bin
    else:
        estimator, bin_ = "prompt", prompt_bin if prompt_bin is not None else MIDDLE_BIN
    choice = table.lookup(bin_, budget_flops)
    if choice is None:
        raise ValueError(f"policy table has no entry for bin {bin_}")
    return estimator, bin_, choice


def load(path: str | Path) -> PolicyTable:
    table = PolicyTable.from_dict(json.loads(Path(path).read_text()))
    if table.hidden_head and not Path(table.hidden_head["path"]).is_absolute():
        table.hidden_head = dict(table.hidden_head, path=str(Path(path).parent / table.hidden_head["path"]))
    return table


def save(table: PolicyTable, path: str | Path) -> None:
    table.save(path)


# ---- calibration helpers (pure; unit-tested) ----------------------------------------------------------------------

def quantile_cuts(stats: Sequence[float], n_bins: int = N_BINS) -> list[float]:
    """Cut points at the 1/n .. (n-1)/n quantiles (linear interpolation), as Snell bins the statistic."""
    xs = sorted(float(s) for s in stats)
    if not xs:
        return [0.0] * (n_bins - 1)
    cuts = []
    for k in range(1, n_bins):
        pos = k / n_bins * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        cuts.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return cuts


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def select_by_cv(correct: Mapping[str, Sequence[float]], cost: Mapping[str, float] | None = None,
                 seed: int = 0) -> tuple[str, float]:
    """Snell's per-bin choice: `correct[config]` is per-problem correctness (0/1, problems aligned across configs).

    Returns (the config best on all problems of the bin, its 2-fold cross-validated accuracy: pick on one half,
    score on the other, both ways, averaged). Ties go to the cheaper config (by `cost`), then by name.
    """
    names = sorted(correct)
    if not names:
        raise ValueError("no configs")
    n = len(correct[names[0]])
    cost = cost or {}

    def best(idx: Sequence[int]) -> str:
        return max(names, key=lambda s: (_mean([correct[s][i] for i in idx]), -cost.get(s, 0.0), s))

    chosen = best(range(n))
    if n < 2:
        return chosen, _mean(correct[chosen])
    order = list(range(n))
    random.Random(seed).shuffle(order)
    f1, f2 = order[: n // 2], order[n // 2:]
    s1, s2 = best(f1), best(f2)
    cv = (_mean([correct[s1][i] for i in f2]) + _mean([correct[s2][i] for i in f1])) / 2
    return chosen, cv
