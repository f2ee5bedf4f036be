"""The two workers train-prm talks to (service.offline.train_prm): the policy worker's /v1/completions for samples
and MC rollouts, the PRM pooling worker's /pooling for the hidden states the head's features are made of. The PRM
worker may serve only the first k layers of the policy model (prepare_models.prepare_reward); its own config.json
(`--reward-model-dir`) gives the depth the head records and the reward FLOPs of the cost report."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ..models.prm_head import PRMTokenizer, step_features
from ..prompts import SYSTEM, math_messages, style_for

DELIM = "\n"


class Workers:
    def __init__(self, args: argparse.Namespace):
        import httpx
        from transformers import AutoTokenizer

        from ..metering import ModelShape
        from ..workers.pool import Endpoint, WorkerPool

        self.http = httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=5.0))
        self.policy_url = args.policy_url.rstrip("/")
        self.tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
        self.prm_tok = PRMTokenizer(self.tokenizer, system=SYSTEM, delimiter=DELIM, prompt=args.prompt)
        self.policy_model = args.policy_model
        self.pool = WorkerPool(name="reward", served_name=args.prm_model,
                               endpoints=[Endpoint(args.prm_url.rstrip("/"), healthy=True)])
        self.shape = ModelShape.from_path(args.model_dir)
        # The PRM worker's model (the first k layers of the policy model): its depth is what the head reads.
        self.reward_shape = ModelShape.from_path(args.reward_model_dir or args.model_dir)
        self.features_dir = Path(args.work_dir) / f"features-{self.reward_shape.n_layer}l-{args.prompt}"

    def sample_costs(self, rows: list[dict]) -> dict[str, Any]:
        from .prm_report import sample_costs

        return sample_costs(rows, self.prm_tok.layout,
                            lambda r: len(self.tokenizer.encode(self.chat_prompt(r["question"], r["source"]),
                                                                add_special_tokens=False)),
                            lambda t: len(self.tokenizer.encode(t, add_special_tokens=False)) + 1,  # + EOS
                            self.shape, self.reward_shape)

    async def resolve_policy_model(self) -> str:
        if not self.policy_model:
            r = await self.http.get(self.policy_url + "/v1/models")
            self.policy_model = r.json()["data"][0]["id"]
        return self.policy_model

    def chat_prompt(self, question: str, source: str) -> str:
        return self.tokenizer.apply_chat_template(math_messages(question, style_for(source)), tokenize=False,
                                                  add_generation_prompt=True)

    async def complete(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                       seed: int | None = None) -> list[list[str]]:
        payload: dict[str, Any] = {"model": await self.resolve_policy_model(), "prompt": prompts, "n": n,
                                   "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        r = await self.http.post(self.policy_url + "/v1/completions", json=payload)
        r.raise_for_status()
        out: list[list[str]] = [[] for _ in prompts]
        for ch in sorted(r.json()["choices"], key=lambda c: c["index"]):
            out[ch["index"] // n].append(ch["text"])
        return out

    async def features(self, question: str, candidates: list[list[str]]) -> list[np.ndarray]:
        from ..workers.pooling import decode_hidden, pooling  # the gateway's own call and decoding

        layouts = [self.prm_tok.layout(question, steps) for steps in candidates]
        # A fresh salt: a worker that reads its prefix cache (the gateway's, pooling_server) returns every row.
        data, _ = await pooling(self.pool, self.pool.served_name, [lay.token_ids for lay in layouts],
                                encoding_format="base64", cache_salt=secrets.token_urlsafe(24))
        return [step_features(decode_hidden(d).reshape(len(lay.token_ids), -1), lay).astype(np.float16)
                for d, lay in zip(data, layouts)]

    async def close(self) -> None:
        await self.http.aclose()
        await self.pool.close()
