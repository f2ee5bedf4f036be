"""FLOPs metering: what the engine computes for the tokens it processes, per worker role.

Per processed token: 2 x non-embedding parameters (every weight matrix is one multiply-add per token), plus attention
over the context it attends to (QK^T and AV: 2 x 2 x n_layer x d_attn x context; averaged over a causal prefill this is
Kaplan et al.'s 2 x n_layer x n_ctx x d_attn), plus the logits (2 x d_model x vocab) at each position whose logits the
engine computes: the sampled positions, one per generated token. Prefill tokens served from vLLM's prefix cache are
not computed and not counted; they are reported apart. Shapes come from the model's own config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    d_model: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        # Multimodal and some newer configs nest the language model's config.
        cfg = cfg.get("text_config", cfg)
        d_model = cfg.get("hidden_size") or cfg["n_embd"]
        n_heads = cfg.get("num_attention_heads") or cfg["n_head"]
        head_dim = cfg.get("head_dim") or d_model // n_heads
        act = str(cfg.get("hidden_act") or cfg.get("hidden_activation") or cfg.get("activation_function") or "")
        model_type = str(cfg.get("model_type", ""))
        # GPT-2-style MLPs have two matrices; Llama/Qwen/Gemma/Mistral gate theirs with a third.
        gated = model_type not in ("gpt2", "gpt_neox", "opt", "gptj") and "gelu_new" not in act
        return cls(
            n_layer=cfg.get("num_hidden_layers") or cfg["n_layer"],
            d_model=d_model,
            n_heads=n_heads,
            head_dim=head_dim,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            d_ff=cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * d_model,
            vocab=cfg["vocab_size"],
            gated_mlp=gated,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelShape":
        p = Path(path)
        cfg_file = p / "config.json" if p.is_dir() else p
        return cls.from_config(json.loads(cfg_file.read_text()))

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def non_embedding_params(self) -> int:
        kv = self.n_kv_heads * self.head_dim
        attention = self.d_model * self.d_attn * 2 + self.d_model * kv * 2  # q, o and k, v projections
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_ff
        return self.n_layer * (attention + mlp)

    def forward_flops(self, new_tokens: int, context_before: int = 0) -> float:
        """FLOPs to run `new_tokens` tokens through the layers after `context_before` tokens already in the KV cache."""
        if new_tokens <= 0:
            return 0.0
        linear = 2.0 * self.non_embedding_params * new_tokens
        # Token i (1-based absolute position) attends to i keys: sum of positions over the new tokens.
        first, last = context_before + 1, context_before + new_tokens
        attended = (first + last) * new_tokens / 2.0
        attention = 4.0 * self.n_layer * self.d_attn * attended
        return linear + attention

    def logits_flops(self, positions: int) -> float:
        return 2.0 * self.d_model * self.vocab * max(0, positions)

    def generation_flops(self, prompt_tokens: int, cached_tokens: int, completion_tokens: Iterable[int]) -> float:
        """One prompt prefilled once (less its cached prefix) and one decode per sample.

        The prefill yields each sample's first token; every further token costs one decode step of the token before.
        """
        cached = min(max(cached_tokens, 0), prompt_tokens)
        flops = self.forward_flops(prompt_tokens - cached, cached)
        for g in completion_tokens:
            if g <= 0:
                continue
            flops += self.forward_flops(g - 1, prompt_tokens)
            flops += self.logits_flops(g)
        return flops

    def encode_flops(self, tokens: int, cached_tokens: int = 0) -> float:
        """A pooling (reward) pass: layers only, no logits."""
        cached = min(max(cached_tokens, 0), tokens)
        return self.forward_flops(tokens - cached, cached)


@dataclass
class RoleUsage:
    flops: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0


@dataclass
class Meter:
    """Accumulates what one request cost, per worker role (policy, reward)."""

    policy: RoleUsage = field(default_factory=RoleUsage)
    reward: RoleUsage = field(default_factory=RoleUsage)

    @property
    def total_flops(self) -> float:
        return self.policy.flops + self.reward.flops

    def add_policy(self, flops: float, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        self._add(self.policy, flops, prompt_tokens, cached_tokens, completion_tokens)

    def add_reward(self, flops: float, tokens: int, cached_tokens: int = 0) -> None:
        self._add(self.reward, flops, tokens, cached_tokens, 0)

    @staticmethod
    def _add(role: RoleUsage, flops: float, prompt: int, cached: int, completion: int) -> None:
        role.flops += flops
        role.prompt_tokens += prompt
        role.cached_tokens += cached
        role.completion_tokens += completion
        role.calls += 1

    def as_dict(self) -> dict[str, float]:
        return {"policy": self.policy.flops, "reward": self.reward.flops, "total": self.total_flops}
