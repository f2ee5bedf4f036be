"""Zero-decode difficulty: a ridge head on the reward worker's hidden states of the question alone.

One prefill of the bare question (no system prompt, no chat template, no sampling) on the pooling worker the PRM
already runs; the head maps poolings of the final-layer states (mean, last token, max, spread) to the bank's
per-problem difficulty label (the one cross-validation picked: see `ttc-gateway train-difficulty`). The prefill's FLOPs
are metered as reward FLOPs and count against the budget like the probe's, but there is no decoding: on the bundled
models a bank question (29 tokens on average) costs about an eighth of one generation, against four for the probe.

The artifact is an .npz like the PRM head: standardisation, coefficients, intercept and a JSON metadata blob (the
model it was trained on, the pooling, the label, cross-validated quality). `version` is its content hash; a policy
table fitted with this estimator records it, so a table and a head that do not belong together are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

# Max and spread over tokens carry what a mean washes out (one large number, one odd word): with them the held-out
# rank correlation rose from 0.58 to 0.59 and the cross-validated one from 0.62 to 0.65 (train-difficulty's report).
POOLINGS = ("mean", "last", "max", "std")


class PromptEncoder(Protocol):
    """Final-layer hidden states of a question, from the reward worker; the implementation meters the call."""

    async def encode(self, question: str) -> np.ndarray: ...

    def estimate_flops(self, question: str) -> float: ...


def pooled_features(hidden: np.ndarray, poolings: Sequence[str] = POOLINGS) -> np.ndarray:
    """(tokens x d) -> the concatenated poolings (over tokens: mean, last token, max, standard deviation)."""
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError("hidden states must be a non-empty (tokens x d) array")
    parts = {"mean": lambda: h.mean(0), "last": lambda: h[-1], "max": lambda: h.max(0), "std": lambda: h.std(0)}
    return np.concatenate([parts[p]() for p in poolings])


@dataclass
class HiddenDifficultyHead:
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("poolings", POOLINGS))

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.std, self.coef):
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        h.update(np.float64(self.intercept).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def fit(cls, features: np.ndarray, targets: Sequence[float], ridge: float,
            metadata: dict[str, Any] | None = None) -> "HiddenDifficultyHead":
        X = np.asarray(features, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        mean, std = X.mean(0), X.std(0)
        std[std == 0] = 1.0
        Z = (X - mean) / std
        intercept = float(y.mean())
        # Dual form: n problems << d features, so solve the n x n system.
        K = Z @ Z.T
        alpha = np.linalg.solve(K + ridge * np.eye(len(y)), y - intercept)
        return cls(mean, std, Z.T @ alpha, intercept, dict(metadata or {}, ridge=ridge))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        Z = (np.atleast_2d(features) - self.mean) / self.std
        return self.intercept + Z @ self.coef

    def predict(self, hidden: np.ndarray) -> float:
        return float(self.predict_features(pooled_features(hidden, self.poolings))[0])

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, mean=self.mean.astype(np.float32), std=self.std.astype(np.float32),
                            coef=self.coef.astype(np.float32), intercept=np.float64(self.intercept),
                            metadata=np.array(json.dumps(self.metadata, sort_keys=True)))

    @classmethod
    def load(cls, path: str | Path) -> "HiddenDifficultyHead":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"].astype(np.float64), z["std"].astype(np.float64), z["coef"].astype(np.float64),
                       float(z["intercept"]), json.loads(str(z["metadata"])))


_LOADED: dict[str, HiddenDifficultyHead] = {}


def load_head(path: str | Path, version: str | None = None) -> HiddenDifficultyHead:
    """The head at `path` (loaded once per process); refuses one whose content is not the `version` a table names."""
    key = str(path)
    head = _LOADED.get(key)
    if head is None:
        head = _LOADED[key] = HiddenDifficultyHead.load(path)
    if version and head.version != version:
        raise ValueError(f"difficulty head {path} is version {head.version}, the policy table was fitted with "
                         f"{version}: refit the table (`ttc-gateway replay --table-out`) or restore the head")
    return head
