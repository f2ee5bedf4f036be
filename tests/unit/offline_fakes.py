"""Synthetic sample-bank problems for the offline tests (the bank's per-problem record, with known structure)."""

from __future__ import annotations

from typing import Any, Sequence


def sample(answer: str | None, correct: bool, score: float, flops: float = 1.0, reward_flops: float = 0.0,
           tokens: int = 10) -> dict[str, Any]:
    return {"answer": answer, "correct": correct, "tokens": tokens, "finish": "stop", "policy_flops": flops,
            "reward_flops": reward_flops, "scores": {"arith": [1.0, score], "prm": [1.0, score]}}


def problem(pid: str, samples: Sequence[dict[str, Any]], question_charge: float = 0.0) -> dict[str, Any]:
    return {"id": pid, "question": f"What is {len(pid)} + 1?", "gold": "42", "question_charge": question_charge,
            "source": "synthetic", "level": None, "samples": list(samples)}


def correct_or_distinct(pid: str, n_correct: int, n: int = 32, **kw: Any) -> dict[str, Any]:
    """n_correct samples answer 42 (score 0.9), the others each give a different wrong answer (score 0.1): every
    selection but majority is right exactly when a correct sample is among the first N."""
    out = [sample("42", True, 0.9, **kw) for _ in range(n_correct)]
    out += [sample(str(100 + j), False, 0.1, **kw) for j in range(n - n_correct)]
    return problem(pid, out)
