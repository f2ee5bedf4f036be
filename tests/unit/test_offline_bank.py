"""The sample bank's storage: header, resumable appends, a cut-off tail, stale banks and missing steps refused with
one clear line; and `ttc-gateway replay` end to end on a synthetic bank."""

from __future__ import annotations

import json

import pytest

from service.cli import build_parser
from service.offline.bank import (BANK_FORMAT, BANK_VERSION, StaleBank, _append_line, prepare_bank,
                                  read_bank, step_scores)
from service.offline.workers import check_prepared
from tests.unit.offline_fakes import correct_or_distinct

HEADER = {"format": BANK_FORMAT, "format_version": BANK_VERSION, "models": {"policy": "m", "reward_head": "h:1"},
          "n_bank": 32, "max_tokens": 96, "temperature": 0.8, "step_delimiter": "\n"}


def test_append_resume_and_cut_off_tail(tmp_path):
    path = tmp_path / "bank.jsonl.gz"
    assert prepare_bank(path, HEADER) == set()
    for i in range(3):
        _append_line(path, correct_or_distinct(f"p{i}", i))
    with open(path, "ab") as fh:  # a kill in the middle of the next member
        fh.write(b"\x1f\x8b\x08\x00garbage")
    assert prepare_bank(path, HEADER) == {"p0", "p1", "p2"}
    header, problems = read_bank(path)
    assert header["n_bank"] == 32 and [p["id"] for p in problems] == ["p0", "p1", "p2"]


def test_bank_lines_carry_no_dataset_text_and_questions_are_joined_back(tmp_path):
    """The bank is committed to the repository, the datasets are not: lines hold ids, the reader joins the text."""
    from service.offline.bank import strip_dataset_text

    data = tmp_path / "datasets" / "toy.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                                        "source": "toy"}) + "\n" for i in range(4)))
    bank = tmp_path / "results" / "bank.jsonl.gz"
    bank.parent.mkdir()
    header = {**HEADER, "datasets": ["../datasets/toy.jsonl"], "seed": 7}  # relative to the bank's folder's parent
    prepare_bank(bank, header)
    rec = strip_dataset_text({**correct_or_distinct("t2", 1), "question": "What is 2 + 1?", "gold": "3"})
    assert "question" not in rec and "gold" not in rec
    _append_line(bank, rec)
    _, problems = read_bank(bank)
    assert problems[0]["question"] == "What is 2 + 1?" and problems[0]["gold"] == "3"
    _, bare = read_bank(bank, questions=False)
    assert "question" not in bare[0]
    with pytest.raises(StaleBank, match="datasets"):  # another mix would make the joined questions wrong
        prepare_bank(bank, {**header, "datasets": ["../datasets/toy.jsonl:2"]})


def test_stale_bank_is_refused_with_one_line(tmp_path):
    path = tmp_path / "bank.jsonl.gz"
    prepare_bank(path, HEADER)
    with pytest.raises(StaleBank) as exc:
        prepare_bank(path, {**HEADER, "models": {"policy": "m", "reward_head": "h:2"}})
    assert "stale sample bank" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_bank_says_which_command_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run `ttc-gateway bank"):
        read_bank(tmp_path / "none.jsonl.gz")


def test_unprepared_model_says_which_command_to_run(tmp_path):
    from service.config import Settings

    s = Settings(models_dir=tmp_path / "models", policy={"urls": ["http://127.0.0.1:1"]},
                 reward={"urls": ["http://127.0.0.1:2"]}, reward_backend="prm*arith")
    with pytest.raises(SystemExit, match="ttc-gateway prepare-models"):
        check_prepared(s)


def test_prm_times_arith_is_the_stepwise_product():
    s = {"scores": {"arith": [1.0, 0.0], "prm": [0.5, 0.8]}}
    assert step_scores(s, "prm*arith") == [0.5, 0.0]


def test_replay_command_writes_a_report_and_a_router_table(tmp_path, monkeypatch):
    import service.offline.evaluate as ev

    path = tmp_path / "bank.jsonl.gz"
    prepare_bank(path, HEADER)
    for i in range(20):
        _append_line(path, correct_or_distinct(f"p{i}", [0, 0, 1, 4, 16][i % 5]))
    monkeypatch.setattr(ev, "current_models", lambda settings=None: HEADER["models"])
    args = build_parser().parse_args(["replay", "--bank", str(path), "--out", str(tmp_path / "out"), "--table-out",
                                      str(tmp_path / "table.json"), "--orderings", "16", "--bootstrap", "100"])
    assert args.func(None, args) == 0
    rep = json.loads((tmp_path / "out" / "replay.json").read_text())
    from service.offline.bank import is_held_out

    held = [f"p{i}" for i in range(20) if is_held_out(f"p{i}")]
    assert rep["problems"] == 20 and rep["table"]["held_out"] == len(held) > 0
    assert "oracle bins" in (tmp_path / "out" / "replay.md").read_text()
    assert (tmp_path / "out" / "replay.png").stat().st_size > 10_000  # the plot with its interval bands
    from service.router.table import load

    table = load(tmp_path / "table.json")
    assert table.models == HEADER["models"] and table.entries
    assert table.calibration["held_out_ids"] == held  # the stable split: the same problems whatever the bank's size

    monkeypatch.setattr(ev, "current_models", lambda settings=None: {"policy": "other"})
    with pytest.raises(StaleBank, match="stale sample bank"):
        args.func(None, args)


def test_held_out_split_is_stable_and_near_its_share():
    from service.offline.bank import is_held_out

    ids = [f"arith-{i}" for i in range(2000)]
    share = sum(map(is_held_out, ids)) / len(ids)
    assert 0.27 < share < 0.33
    assert [is_held_out(i) for i in ids[:50]] == [is_held_out(i) for i in ids[:50]]
