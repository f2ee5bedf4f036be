"""A small process reward head on the policy model's own hidden states (SmolLM2-135M), and the token layout it reads.

Layout (`format_for_prm`): the question prompt, then every step as its own tokenised segment `step + delimiter`.
The prompt is the head's `prompt` (metadata): "chat" = the chat template of [system = the head's `system`, user =
question] with the generation prompt (heads before the short layout: system = the solving instruction), or "bare" =
the question text and one delimiter, no template (fewer tokens per candidate: the pooling worker re-reads the prompt
for every candidate, PREFIX_CACHE_FINDING in service/workers/reward.py). Token ids are built segment by
segment, so the position where each step ends is exact (no re-tokenisation of the joined text that could merge a step's
last token with the next step's first) and the same ids go to the pooling worker: the worker never tokenises.

Features per step (from the last-layer hidden states the pooling worker returns, one 576-vector per token; the worker
may serve only the first `layers` (metadata) of the model's layers):
    [h at the step's last token (the delimiter), mean of h over the step's tokens, mean of h over all solution tokens
     so far]
The head standardises them (mean/std from training) and applies a logistic layer, or a one-hidden-layer MLP when the
trained artifact carries one. Scores are sigmoid(logit), so in [0, 1] and monotone in the logit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT_VERSION = 1
FEATURES = ("last", "step_mean", "prefix_mean")
PROMPTS = ("chat", "bare")


@dataclass
class PRMLayout:
    """Token ids of one candidate for the PRM forward pass and where its steps lie (half-open token ranges)."""

    token_ids: list[int]
    prompt_len: int
    step_spans: list[tuple[int, int]]  # (start, end) per step; the step's score is read at end - 1

    @property
    def step_ends(self) -> list[int]:
        return [end - 1 for _, end in self.step_spans]


def normalise_step(step: str, delimiter: str) -> str:
    """A step's text with exactly one trailing delimiter (steps come with or without it)."""
    if step.endswith(delimiter):
        step = step[: -len(delimiter)]
    return step + delimiter


class PRMTokenizer:
    """Builds PRM layouts with the model folder's tokenizer; prompt ids are memoised per question."""

    def __init__(self, tokenizer: Any, system: str | None = None, delimiter: str = "\n", prompt: str = "chat"):
        self.tokenizer = tokenizer
        if system is None:
            from ..prompts import SYSTEM as system  # noqa: N811
        if prompt not in PROMPTS:
            raise ValueError(f"PRM prompt {prompt!r}: one of {PROMPTS}")
        self.system = system
        self.delimiter = delimiter
        self.prompt = prompt
        self._prompt_cache: dict[str, list[int]] = {}
        self._step_cache: dict[str, list[int]] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, head: "PRMHead | None" = None, **kw: Any) -> "PRMTokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        return cls.for_head(tokenizer, head) if head is not None else cls(tokenizer, **kw)

    @classmethod
    def for_head(cls, tokenizer: Any, head: "PRMHead") -> "PRMTokenizer":
        """The layout `head` was trained on (its metadata: system, delimiter, prompt)."""
        return cls(tokenizer, system=head.metadata.get("system"), delimiter=head.delimiter, prompt=head.prompt)

    def prompt_ids(self, question: str) -> list[int]:
        ids = self._prompt_cache.get(question)
        if ids is None and self.prompt == "bare":
            ids = list(self.tokenizer.encode(question.strip() + self.delimiter, add_special_tokens=False))
        elif ids is None:
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question.strip()}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some transformers versions
                ids = ids["input_ids"]
            ids = list(ids)
        if question not in self._prompt_cache:
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[question] = ids
        return ids

    def step_ids(self, step: str) -> list[int]:
        seg = normalise_step(step, self.delimiter)
        ids = self._step_cache.get(seg)
        if ids is None:
            ids = list(self.tokenizer.encode(seg, add_special_tokens=False))
            if len(self._step_cache) > 65536:
                self._step_cache.clear()
            self._step_cache[seg] = ids
        return ids

    def layout(self, question: str, steps: Sequence[str]) -> PRMLayout:
        ids = list(self.prompt_ids(question))
        prompt_len = len(ids)
        spans = []
        for step in steps:
            seg = self.step_ids(step)
            start = len(ids)
            ids.extend(seg)
            spans.append((start, len(ids)))
        return PRMLayout(ids, prompt_len, spans)


def format_for_prm(question: str, steps: Sequence[str], tokenizer: PRMTokenizer) -> PRMLayout:
    """Token layout of one candidate (see the module docstring)."""
    return tokenizer.layout(question, steps)


def step_features(hidden: np.ndarray, layout: PRMLayout) -> np.ndarray:
    """(steps, 3 * d) features from one candidate's per-token hidden states (tokens x d)."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if hidden.shape[0] != len(layout.token_ids):
        raise ValueError(f"hidden states for {hidden.shape[0]} tokens, layout has {len(layout.token_ids)}")
    d = hidden.shape[1]
    out = np.zeros((len(layout.step_spans), 3 * d), dtype=np.float32)
    csum = np.cumsum(hidden[layout.prompt_len:], axis=0, dtype=np.float64)
    for k, (start, end) in enumerate(layout.step_spans):
        if end <= start:  # an empty step (tokenised to nothing): repeat what came before
            if k:
                out[k] = out[k - 1]
            continue
        out[k, :d] = hidden[end - 1]
        out[k, d:2 * d] = hidden[start:end].mean(axis=0)
        out[k, 2 * d:] = csum[end - 1 - layout.prompt_len] / (end - layout.prompt_len)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


@dataclass
class PRMHead:
    """Standardisation + logistic (or 1-hidden-layer MLP) head; numpy only at inference."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # (d,) logistic, or (h,) output layer of the MLP
    bias: float
    hidden_w: np.ndarray | None = None  # (d, h) for the MLP
    hidden_b: np.ndarray | None = None  # (h,)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def delimiter(self) -> str:
        return str(self.metadata.get("step_delimiter", "\n"))

    @property
    def prompt(self) -> str:
        return str(self.metadata.get("prompt", "chat"))

    @property
    def layers(self) -> int | None:
        """The decoder layers the reward worker serves for this head (the first k); None: all (older heads)."""
        return int(self.metadata["layers"]) if self.metadata.get("layers") else None

    @property
    def version(self) -> str:
        """Content hash of the parameters (goes into cache keys: a retrained head never reads old scores)."""
        h = hashlib.sha256()
        for arr in (self.mean, self.std, self.weights, np.asarray([self.bias]), self.hidden_w, self.hidden_b):
            if arr is not None:
                h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        h.update(json.dumps(self.metadata.get("features", FEATURES)).encode())
        return h.hexdigest()[:16]

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, dtype=np.float32) - self.mean) / self.std
        if self.hidden_w is not None:
            x = np.maximum(x @ self.hidden_w + self.hidden_b, 0.0)
        return x @ self.weights + self.bias

    def score(self, features: np.ndarray) -> np.ndarray:
        """Step scores in [0, 1]."""
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        return _sigmoid(self.logits(features)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.setdefault("format_version", FORMAT_VERSION)
        meta.setdefault("features", list(FEATURES))
        arrays = {"mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32),
                  "weights": self.weights.astype(np.float32), "bias": np.asarray([self.bias], dtype=np.float32),
                  "metadata": np.asarray(json.dumps(meta, sort_keys=True))}
        if self.hidden_w is not None:
            arrays["hidden_w"] = self.hidden_w.astype(np.float32)
            arrays["hidden_b"] = self.hidden_b.astype(np.float32)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "PRMHead":
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["metadata"]))
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"{path}: PRM head format {meta['format_version']} is newer than this code")
            return cls(mean=z["mean"], std=z["std"], weights=z["weights"], bias=float(z["bias"][0]),
                       hidden_w=z["hidden_w"] if "hidden_w" in z else None,
                       hidden_b=z["hidden_b"] if "hidden_b" in z else None, metadata=meta)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, sample_weight: np.ndarray | None = None,
                 iters: int = 200) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression on standardised x with soft labels y in [0, 1] (torch LBFGS)."""
    import torch

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    wt = torch.as_tensor(sample_weight if sample_weight is not None else np.ones(len(y)), dtype=torch.float32)
    wt = wt / wt.sum()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ w + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().astype(np.float32), float(b.detach().numpy()[0])


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 64, l2: float = 1e-3, epochs: int = 60, seed: int = 0,
            sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A one-hidden-layer ReLU MLP (Adam, weight decay); returns (hidden_w, hidden_b, out_w, out_b)."""
    import torch

    torch.manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    wt = torch.as_tensor(sample_weight if sample_weight is not None else np.ones(len(y)), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=l2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm), 256):
            idx = perm[i:i + 256]
            opt.zero_grad()
            z = net(xt[idx]).squeeze(-1)
            loss = (wt[idx] * torch.nn.functional.binary_cross_entropy_with_logits(z, yt[idx], reduction="none"))
            loss.mean().backward()
            opt.step()
    l1, l2_ = net[0], net[2]
    return (l1.weight.detach().numpy().T.copy(), l1.bias.detach().numpy().copy(),
            l2_.weight.detach().numpy()[0].copy(), float(l2_.bias.detach().numpy()[0]))
