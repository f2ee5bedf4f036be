"""Production PRMs served by vLLM's STEP pooler, behind the same cached `score()` as the bundled head.

Two families (`reward.format` in the configuration):
- `qwen-prm`: Qwen2.5-Math-PRM-7B/72B (`Qwen2ForProcessRewardModel`, served as it is with `--runner pooling`). The
  conversation (system prompt, question, the steps each followed by the `<extra_0>` tag) is rendered by the model's
  own chat template; at every tag the model's two-way head gives [bad, good] logits.
- `math-shepherd`: peiyi9979/math-shepherd-mistral-7b-prm and PRMs trained like it: a causal LM whose next token at
  the step tag ` ки` is `+` (good step) or `-` (bad). vLLM serves it as a token classifier made of those two rows of
  the LM head: `--convert classify --hf-overrides '{"classifier_from_token": ["+", "-"], "method":
  "no_post_processing"}' --pooler-config '{"tok_pooling_type": "STEP", "step_tag_id": <id>}'`.

One round = one /tokenize per new candidate (the worker's own tokenizer and template, so what we count is what the
PRM reads) and one /pooling call with all candidates' token ids; per candidate the worker returns one row of logits
per step tag, and the step score is softmax(row)[good_index].

The classic bug of this design (seen in peers): a step tag that does not tokenise to the single id the PRM was trained
on (" ки" is one Mistral token but two SmolLM2 tokens; a tag glued to the step's last word merges with it). Then the
pooler finds no tags, or too many, and every score is garbage. `check_step_tag` runs at start-up against the worker's
own tokenizer and refuses to serve on a mismatch; `score` re-checks the tag count of every candidate.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from ..cache.base import Cache
from ..metering import Meter, ModelShape
from .pool import WorkerPool
from .pooling import pooling
from .reward import CachedStepScorer

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class StepTagFormat:
    name: Literal["qwen-prm", "math-shepherd"]
    step_tag: str
    # The id the PRM was trained to score at (None: whatever single id the tag tokenises to).
    step_tag_id: int | None
    # Column of the pooled row that means "good step" (Qwen: [bad, good]; Math-Shepherd: ["+", "-"]).
    good_index: int
    system: str = QWEN_SYSTEM

    @classmethod
    def named(cls, name: str, step_tag: str = "", step_tag_id: int | None = None,
              good_index: int | None = None) -> "StepTagFormat":
        if name == "qwen-prm":
            return cls("qwen-prm", step_tag or "<extra_0>", step_tag_id if step_tag_id is not None else 151651,
                       1 if good_index is None else good_index)
        if name == "math-shepherd":
            return cls("math-shepherd", step_tag or " ки", step_tag_id if step_tag_id is not None else 12902,
                       0 if good_index is None else good_index)
        raise ValueError(f"unknown step-tag PRM format {name!r}")

    @classmethod
    def from_settings(cls, reward: Any) -> "StepTagFormat":
        """From the reward pool's settings (format, step_tag, step_tag_id, good_index)."""
        return cls.named(reward.format, reward.step_tag, reward.step_tag_id, reward.good_index)

    def clean(self, step: str) -> str:
        """A step as the PRM reads it: without the tag text (a model that writes the tag must not fake a step) and
        without the trailing whitespace the tag replaces."""
        return step.replace(self.step_tag.strip() or self.step_tag, "").rstrip()

    def tokenize_body(self, model: str, question: str, steps: Sequence[str]) -> dict[str, Any]:
        question = question.replace(self.step_tag.strip() or self.step_tag, " ")
        steps = [self.clean(s) for s in steps]
        if self.name == "qwen-prm":
            content = "".join(s + self.step_tag for s in steps)
            return {"model": model, "messages": [{"role": "system", "content": self.system},
                                                 {"role": "user", "content": question},
                                                 {"role": "assistant", "content": content}],
                    "add_generation_prompt": False}
        # Math-Shepherd: "question step1 ки\nstep2 ки" (its training format), no chat template.
        text = question + " " + "\n".join(s + self.step_tag for s in steps)
        return {"model": model, "prompt": text, "add_special_tokens": True}


class StepTagError(RuntimeError):
    """The configured step tag does not tokenise to what the PRM expects: scores would be meaningless."""


def _softmax_column(row: Sequence[float], column: int) -> float:
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    return exps[column] / sum(exps)


class StepTagPRMClient(CachedStepScorer):
    def __init__(self, pool: WorkerPool, shape: ModelShape, fmt: StepTagFormat, cache: Cache | None = None,
                 cache_ttl_s: float = 86400, max_model_len: int = 4096):
        super().__init__(pool, shape, cache, cache_ttl_s)
        self.fmt = fmt
        self.max_model_len = max_model_len
        self.tag_id = fmt.step_tag_id
        self.reward_name = f"prm:{fmt.name}"
        self.version = f"{fmt.name}:{fmt.step_tag_id}:{fmt.good_index}"
        # Tokens of the layout around the text (chat template, special tokens), measured at the step-tag check on
        # an empty solution; until then a generous guess. With them the budget estimate is a true upper bound.
        self._layout_tokens = 256
        self._checked = False

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        out = await self.pool.post_json("/tokenize", body)
        return [int(t) for t in out["tokens"]]

    async def check_step_tag(self) -> int:
        """Start-up check against the worker's tokenizer: the tag alone is one token (the configured id, if one is
        configured), and a rendered three-step solution holds exactly three of it. Returns the tag id."""
        alone = await self._tokenize({"model": self.model, "prompt": self.fmt.step_tag, "add_special_tokens": False})
        if len(alone) != 1:
            raise StepTagError(f"step tag {self.fmt.step_tag!r} tokenises to {len(alone)} tokens {alone} with "
                               f"{self.model}'s tokenizer; the {self.fmt.name} PRM scores one tag token")
        if self.fmt.step_tag_id is not None and alone[0] != self.fmt.step_tag_id:
            raise StepTagError(f"step tag {self.fmt.step_tag!r} is token {alone[0]} for {self.model}, but the PRM "
                               f"expects {self.fmt.step_tag_id} (reward.step_tag_id)")
        tag_id = alone[0]
        steps = ["Step 1: 3 + 5 = 8.", "Step 2: 8 * 2 = 16.", "The answer is 16."]
        ids = await self._tokenize(self.fmt.tokenize_body(self.model, "What is (3 + 5) * 2?", steps))
        found = ids.count(tag_id)
        if found != len(steps):
            raise StepTagError(f"a rendered {len(steps)}-step solution holds {found} step tags (id {tag_id}) "
                               f"after {self.model}'s tokenizer: the tag merges with its neighbours")
        empty = await self._tokenize(self.fmt.tokenize_body(self.model, "", [""]))
        self._layout_tokens = len(empty) + 8  # + what a merge at the text's edges could add
        self.tag_id, self._checked = tag_id, True
        return tag_id

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        """Upper bound for the anytime budget: a byte-level tokenizer makes at most one token per UTF-8 byte of the
        text (never a learned characters-per-token ratio: rare code points are several tokens each)."""
        total = 0.0
        for steps in candidates:
            if steps:
                text = question + "".join(s + self.fmt.step_tag + "\n" for s in steps)
                tokens = len(text.encode("utf-8", "surrogatepass")) + self._layout_tokens
                total += self.shape.encode_flops(min(self.max_model_len, tokens))
        return total

    async def _score_uncached(self, question: str, candidates: Sequence[Sequence[str]], meter: Meter | None,
                              keys: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
        if not self._checked:  # remote workers that were not up at start-up are checked before first use
            await self.check_step_tag()
        bodies = [self.fmt.tokenize_body(self.model, question, steps) for steps in candidates]
        token_lists = list(await asyncio.gather(*(self._tokenize(b) for b in bodies)))
        token_lists = [ids[: self.max_model_len] for ids in token_lists]
        data, usage = await pooling(self.pool, self.model, token_lists, task="token_classify",
                                    use_activation=False)
        if meter is not None:
            self._meter_lengths(meter, usage, [len(ids) for ids in token_lists])
        out = []
        for item, ids, steps in zip(data, token_lists, candidates):
            rows = item.get("data") or []
            if rows and not isinstance(rows[0], list):
                rows = [rows]
            tags = ids.count(self.tag_id) if self.tag_id is not None else len(rows)
            if len(rows) != tags or tags > len(steps):
                raise StepTagError(f"PRM returned {len(rows)} step rows for {tags} step tags ({len(steps)} steps)")
            out.append([_softmax_column(r, self.fmt.good_index) for r in rows])
        return out
