"""Every strategy through the HTTP API with the openai client, against the real vLLM policy worker and the
configured step verifier."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

SYSTEM = "Solve the problem step by step, one calculation per line, and end with 'The answer is N.'"
QUESTION = "Tom has 4 apples and gets 3 more. How many apples does he have now?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

CASES = {
    "greedy": {},
    "best_of_n": {"n": 4, "selection": "weighted"},
    "beam_search": {"n": 4, "beam_width": 2, "max_rounds": 4},
    "dvts": {"n": 4, "beam_width": 2, "max_rounds": 4},
    "rebase": {"n": 4, "max_rounds": 4},
    "revisions": {"n": 2, "chain_length": 2},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strategy_through_api(client, model_name, name):
    params = dict(CASES[name], strategy=name)
    # A seed of its own per strategy: identical steps would be PRM cache hits costing no reward FLOPs.
    seed = 100 + sorted(CASES).index(name)
    resp = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=64, seed=seed,
                                          extra_body={"ttc": params})
    assert resp.choices[0].message.content
    ttc = resp.model_extra["ttc"]
    assert ttc["strategy"] == name
    assert ttc["flops"]["policy"] > 0 and ttc["flops"]["total"] == pytest.approx(resp.usage.model_extra["flops"])
    assert ttc["samples"] >= 1
    for key, value in CASES[name].items():
        assert ttc["params"][key] == value
    if name != "greedy":
        assert ttc["reward"] == "prm*arith"  # the embedded default: learned PRM x calculator
        assert ttc["flops"]["reward"] > 0  # every reward-guided strategy scored its candidates


def test_flops_grow_with_n(base_url, model_name):
    def flops(n: int) -> float:
        body = {"model": model_name, "messages": MESSAGES, "max_tokens": 48, "seed": 11,
                "ttc": {"strategy": "best_of_n", "n": n}}
        r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["ttc"]["samples"] == n
        return float(r.headers["x-ttc-flops"])

    assert flops(8) > 1.5 * flops(2)


def test_strategy_from_header(base_url, model_name):
    body = {"model": model_name, "prompt": "2 + 2 =", "max_tokens": 8}
    r = httpx.post(base_url + "/v1/completions", json=body, headers={"X-TTC-Strategy": "greedy"}, timeout=120)
    assert r.status_code == 200
    assert r.headers["x-ttc-strategy"] == "greedy" and r.json()["ttc"]["strategy"] == "greedy"


def test_streaming_search_sends_keepalive_or_content_then_done(base_url, model_name):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 48, "stream": True,
            "stream_options": {"include_usage": True},
            "ttc": {"strategy": "beam_search", "n": 4, "beam_width": 2, "max_rounds": 4}}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["flops"] > 0 and usage["ttc"]["strategy"] == "beam_search"


def test_best_of_n_early_stopping_through_api(base_url, model_name):
    """Rounds of 2 samples, the Beta rule and the hopeless stop: within the budget, JSON and streamed alike."""
    import json

    budget = 3.0e11
    ttc = {"strategy": "best_of_n", "n": 6, "stopping": "beta", "stop_threshold": 0.8, "hopeless_k": 2,
           "round_size": 2}
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 32, "seed": 5, "ttc": ttc}
    headers = {"X-TTC-Budget-FLOPs": f"{budget}"}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()["ttc"]
    es = out["details"]["early_stopping"]
    assert es["stopped"] in ("settled", "hopeless", "n", "budget") and 1 <= es["rounds"] <= 3
    assert out["samples"] == es["samples"] == 2 * es["rounds"] or es["stopped"] == "budget"
    assert out["flops"]["total"] <= budget and out["params"]["stopping"] == "beta"
    with httpx.stream("POST", base_url + "/v1/chat/completions", headers=headers, timeout=300,
                      json=dict(body, seed=6, stream=True, stream_options={"include_usage": True})) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = chunks[-1]
    assert usage["usage"]["flops"] <= budget and "early_stopping" in usage["ttc"]["details"]


def test_best_of_n_tops_up_what_the_worst_case_cut(base_url, model_name):
    """max_tokens 256 makes the worst case of one sample several times its real cost: the first call is cut to a
    few samples, then top-up rounds draw more once the real cost is metered, and the total stays within budget."""
    budget = 3.0e11
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 256, "seed": 21,
            "ttc": {"strategy": "best_of_n", "n": 12}}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"X-TTC-Budget-FLOPs": f"{budget}"},
                   timeout=600)
    assert r.status_code == 200, r.text
    ttc = r.json()["ttc"]
    top_up = ttc["details"]["top_up"]
    assert top_up["rounds"] >= 1 and top_up["samples"][0] < 12, top_up
    assert ttc["samples"] == sum(top_up["samples"]) > top_up["samples"][0]
    assert ttc["details"]["selection_used"] == "weighted" and ttc["details"]["n_used"] == ttc["samples"]
    assert ttc["calls"]["policy"] == top_up["rounds"] + 1 and float(r.headers["x-ttc-flops"]) <= budget


@pytest.mark.parametrize("ttc,param", [
    ({"strategy": "best_of_n", "selection": "majority", "hopeless_k": 4}, "ttc.hopeless_k"),
    ({"strategy": "beam_search", "n": 4, "beam_width": 8}, "ttc.beam_width"),
    ({"strategy": "best_of_n", "n": 0}, "ttc.n"),
    ({"strategy": "best_of_n", "selection": "loudest"}, "ttc.selection"),
    ({"strategy": "teleport"}, "ttc.strategy"),
    ({"strategy": "best_of_n", "colour": "red"}, "ttc.colour"),
])
def test_bad_strategy_params_are_400(base_url, model_name, ttc, param):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 8, "ttc": ttc}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_budget_is_never_exceeded(base_url, model_name):
    budget = 2.0e11
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 48,
            "ttc": {"strategy": "best_of_n", "n": 16}}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"X-TTC-Budget-FLOPs": f"{budget}"},
                   timeout=300)
    assert r.status_code == 200, r.text
    ttc = r.json()["ttc"]
    assert ttc["flops"]["total"] <= budget
    assert ttc["samples"] < 16 and ttc["budget_exhausted"] is True


def test_auto_reports_difficulty_and_expected_accuracy(base_url, model_name):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 48}
    headers = {"X-TTC-Strategy": "auto", "X-TTC-Budget-FLOPs": "5e11"}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-ttc-strategy"] == "auto"
    assert 1 <= int(r.headers["x-ttc-difficulty"]) <= 5
    assert 0.0 <= float(r.headers["x-ttc-expected-accuracy"]) <= 1.0
    ttc = r.json()["ttc"]
    assert ttc["flops"]["total"] <= 5e11
    assert ttc["details"]["auto"]["strategy"] in ("best_of_n", "beam_search", "dvts", "rebase", "revisions",
                                                  "greedy")
    assert float(r.headers["x-ttc-budget-remaining-flops"]) >= 0
