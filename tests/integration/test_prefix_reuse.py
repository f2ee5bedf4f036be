"""Tree search on the real policy worker reuses its own prefixes, and the meter counts prefill as the worker does.

Read from vLLM's own counters (`vllm:prompt_tokens_total`, `vllm:prefix_cache_hits_total`), not the gateway's
figures: every round after the first re-sends the question prompt, so each of those calls must find at least the
prompt's whole KV blocks cached; and the `ttc.tokens` the gateway reports must be what the worker counted.
"""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.integration

QUESTION = "A box holds 12 pens. Sara buys 7 boxes and gives 15 pens to her class. How many pens are left?"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def worker_counters(worker_url: str) -> dict[str, float]:
    text = httpx.get(worker_url + "/metrics", timeout=10).text

    def value(name: str) -> float:
        m = re.search(rf"^vllm:{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        assert m, f"vllm:{name} missing from the worker's /metrics"
        return float(m.group(1))

    block = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', text)
    assert block, "vllm:cache_config_info has no block_size"
    return {"prompt": value("prompt_tokens_total"), "hits": value("prefix_cache_hits_total"),
            "block": float(block.group(1))}


def ask(base_url: str, model: str, ttc: dict, seed: int) -> dict:
    r = httpx.post(base_url + "/v1/chat/completions", headers=NO_CACHE, timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 128, "seed": seed,
        "ttc": ttc})
    assert r.status_code == 200, r.text
    return r.json()["ttc"]


@pytest.mark.parametrize("strategy", ["beam_search", "rebase"])
def test_search_rounds_hit_the_prefix_cache_and_the_meter_agrees(gateway, model_name, strategy):
    worker = gateway.worker_url
    # The round-1 prompt's length: one sample of the same question costs exactly that many prompt tokens.
    first_prompt = ask(gateway.base_url, model_name, {"strategy": "best_of_n", "n": 1}, seed=1)["tokens"]
    prompt_len = first_prompt["policy_prompt"]
    before = worker_counters(worker)
    assert before["block"] <= 32, "the embedded policy worker should run with 32-token KV blocks"
    ttc = ask(gateway.base_url, model_name, {"strategy": strategy, "n": 4, "max_rounds": 3}, seed=23)
    after = worker_counters(worker)
    prompt, hits = after["prompt"] - before["prompt"], after["hits"] - before["hits"]
    calls = ttc["calls"]["policy"]
    assert calls >= 2, ttc
    whole_blocks = (prompt_len - 1) // int(before["block"]) * int(before["block"])
    # Every call after the first re-sends the question prompt at least once.
    assert hits >= (calls - 1) * whole_blocks, (hits, calls, whole_blocks)
    assert 1 - hits / prompt <= 0.5, f"prefill computed / requested {1 - hits / prompt:.2f}"
    # Prompt tokens as the worker counts them (n > 1 samples each prefill the prompt).
    assert ttc["tokens"]["policy_prompt"] == prompt
    # vLLM reports one sample's cached tokens per request: for a prompt it has never seen, the first sample's are
    # fewer; so the meter may count more cached tokens than the worker, by at most the prompt's blocks per call.
    assert hits <= ttc["tokens"]["policy_cached"] <= hits + calls * whole_blocks + calls * 96

    # The same seeded search again: every prompt is now cached before it is sent, and the meter is exact.
    again_before = worker_counters(worker)
    again = ask(gateway.base_url, model_name, {"strategy": strategy, "n": 4, "max_rounds": 3}, seed=23)
    again_after = worker_counters(worker)
    assert again["tokens"]["policy_prompt"] == again_after["prompt"] - again_before["prompt"]
    assert again["tokens"]["policy_cached"] == again_after["hits"] - again_before["hits"]
