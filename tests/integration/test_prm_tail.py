"""The learned PRM's worker reads its prefix cache (service/workers/pooling_server.py) and the gateway scores a new
step from its rows plus the parent's running state: against the REAL reward worker the embedded gateway starts, a
round that extends candidates by one step computes about the new steps' tokens (not the whole layouts) with the
scores of a whole pass, and a beam search through the API pays per round about what its new steps cost while the
whole re-encode (the same worker, TTC_REWARD__PREFIX_READS=false) grows with depth."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.metering import Meter, ModelShape
from service.models.prm_head import PRMHead, PRMTokenizer, step_features
from service.workers.pool import Endpoint, WorkerPool
from service.workers.pooling import decode_hidden, pooling
from service.workers.reward import MeteredPRM, PRMClient

pytestmark = pytest.mark.integration

HEAD = Path(__file__).resolve().parents[2] / "service" / "data" / "prm_head_smollm2.npz"
BLOCK = 32  # the reward worker's --block-size (RewardPoolSettings)


def _tolerance() -> float:
    """The worker runs float32 while prefix reads are on (gateway.reward_prefix_reads): its rows are bitwise a whole
    pass's, so scores agree to float32 rounding (in bf16 they would not: rows depend on the pass's shape)."""
    return 1e-6


def _client(url: str, model_dir: Path, states: int = 4096) -> PRMClient:
    head = PRMHead.load(HEAD)
    pool = WorkerPool(name="reward", served_name="prm", endpoints=[Endpoint(url, healthy=True)])
    return PRMClient(pool, ModelShape.from_path(model_dir), head, PRMTokenizer.from_model_dir(model_dir, head),
                     tail_states=states)


async def _whole_scores(client: PRMClient, question: str, cands) -> list[list[float]]:
    """Every row of a whole pass: one call per candidate, each under its own fresh salt (inputs of one call share
    blocks, salted or not)."""
    out = []
    for steps in cands:
        lay = client.layout(question, steps)
        data, _ = await pooling(client.pool, "prm", [lay.token_ids], encoding_format="base64",
                                cache_salt=uuid.uuid4().hex)
        rows = decode_hidden(data[0]).reshape(len(lay.token_ids), -1)
        out.append([float(np.float32(x)) for x in client.head.score(step_features(rows, lay))])
    return out


def test_a_round_of_one_new_step_computes_the_new_steps_with_whole_pass_scores(pooling_worker, prepared_reward_dir):
    asyncio.run(_one_new_step(pooling_worker.url, prepared_reward_dir))  # one loop: the pools' sessions live in it


async def _one_new_step(url: str, model_dir: Path) -> None:
    client = _client(url, model_dir)
    question = f"Order {uuid.uuid4().hex[:8]}: a crate holds 24 bottles. A shop gets 6 crates and sells 50 " \
               "bottles. How many bottles are left?"
    first = [["6 * 24 = 144"], ["Six crates of 24 bottles make 144 bottles."], ["24 + 6 = 30"],
             ["The shop gets 6 crates."]]
    nxt = ["144 - 50 = 94", "Selling 50 of them leaves 94.", "Then 30 - 50 is negative, so recheck.",
           "Each crate has 24 bottles, so 6 * 24 = 144."]
    await MeteredPRM(client, Meter()).score(question, first)
    second = [c + [s] for c, s in zip(first, nxt)]
    m2 = Meter()
    scores = await MeteredPRM(client, m2).score(question, second)
    lays = [client.layout(question, c) for c in second]
    new = sum(len(lay.token_ids) - lay.step_spans[-1][0] for lay in lays)
    sent = sum(len(lay.token_ids) for lay in lays)
    computed = m2.reward.prompt_tokens - m2.reward.cached_tokens
    assert m2.reward.prompt_tokens == sent and m2.reward.calls == 1
    # The new steps' tokens, plus at most the part of each parent's last block that was not full.
    assert new <= computed <= new + len(second) * (BLOCK - 1), (new, computed, sent)
    assert computed < 0.6 * sent
    assert m2.reward.flops <= client.estimate_flops(question, second)
    whole = await _whole_scores(client, question, second)
    assert np.allclose(scores, whole, rtol=0, atol=_tolerance()), np.abs(np.array(scores) - np.array(whole)).max()
    # A client without parent states needs every solution row: rows a sibling did not return are recomputed under
    # a fresh salt (what the cache skipped), at most a whole pass each, and the same scores.
    off = _client(url, model_dir, states=0)
    m3 = Meter()
    again = await MeteredPRM(off, m3).score(question, second)
    assert np.allclose(again, whole, rtol=0, atol=_tolerance()), np.abs(np.array(again) - np.array(whole)).max()
    assert m2.reward.flops < m3.reward.flops <= off.estimate_flops(question, second)
    await client.pool.close()
    await off.pool.close()


def _beam(base_url: str, model: str, question: str, rounds: int) -> dict:
    r = httpx.post(base_url + "/v1/chat/completions", timeout=900, headers={"Cache-Control": "no-cache, no-store"},
                   json={"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 256,
                         "seed": 5, "ttc": {"strategy": "beam_search", "n": 4, "max_rounds": rounds}})
    assert r.status_code == 200, r.text
    return r.json()["ttc"]


def test_beam_search_reward_flops_per_round_stay_flat_with_depth(gateway, model_name):
    question = (f"Trip {uuid.uuid4().hex[:8]}: a bus starts with 18 people. At the first stop 7 get off and 5 "
                "get on, at the second 9 get off and 12 get on, at the third 4 get off. How many are on the bus?")
    ttc = _beam(gateway.base_url, model_name, question, rounds=8)  # the worker has never seen this question
    spent, whole = ttc["details"]["score_flops"], ttc["details"]["score_bound_flops"]
    # Each round's bound is a whole re-encode of its candidates: at N=4 what a stock worker charged for the rounds
    # that sent any (measured with TTC_REWARD__PREFIX_READS=false: 1.0, 0.56, 1.0, 1.0 of it). Rounds whose children
    # were all scored before cost 0; the last one generates to the end (several new steps).
    later = [(s, w) for s, w in zip(spent[1:-1], whole[1:-1]) if s > 0]
    assert len(later) >= 2, ttc["details"]
    assert max(whole) > 1.5 * whole[0], whole  # the whole re-encode grows with depth
    assert later[-1][0] <= 0.6 * later[-1][1], (spent, whole)  # the tail pays about the new step
    assert sum(s for s, _ in later) <= 0.6 * sum(w for _, w in later), (spent, whole)
    assert sum(spent) <= sum(whole) and ttc["flops"]["reward"] == pytest.approx(sum(spent), rel=1e-3)
