"""Fitting the policy table from recorded grid results (offline: no workers): per-config outcomes and FLOPs,
budgets in generations, the per-(bin, budget) choice by 2-fold cross-validation, routing replays and the choice of
difficulty estimator. `calibrate` records the runs; this module turns them into a table, and `bench` reuses it."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import random
from dataclasses import dataclass

from ..router.table import N_BINS, PolicyTable, choose, quantile_cuts, select_by_cv, uses_probe
from ..strategies.base import Problem

BON_N = 16
MAX_TOKENS = 96
TEMPERATURE = Problem.temperature  # the search temperature the gateway samples at
BUDGET_GENERATIONS = (1, 2, 4, 8, 16, 32, 64)
PROBE_KS = (2, 4)


@dataclass(frozen=True)
class Config:
    strategy: str
    params: tuple[tuple[str, Any], ...]
    # Nominal cost in generations (Snell: N; lookahead k: N * (k + 1)). Only a label: the table selects by the
    # MEASURED mean FLOPs (step search re-scores growing prefixes every round and costs far more than N samples).
    generations: int

    @property
    def key(self) -> str:
        return config_key(self.strategy, dict(self.params))

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)


def config_key(strategy: str, params: dict[str, Any]) -> str:
    return strategy + ":" + ",".join(f"{k}={params[k]}" for k in sorted(params))


def _bon_select(samples: Sequence[dict[str, Any]], selection: str) -> bool:
    from ..strategies.voting import Candidate, select

    cands = [Candidate(text="", answer=s["answer"], score=s["last"]) for s in samples]
    if not cands:
        return False
    chosen = select(cands, selection).candidate  # type: ignore[arg-type]
    return bool(samples[next(j for j, c in enumerate(cands) if c is chosen)]["correct"])


def bon_outcome(bon: dict[str, Any], n: int, selection: str) -> tuple[bool, float]:
    """(correct, FLOPs) of best-of-n from the first n samples of the shared draw."""
    samples = bon["samples"][:n]
    flops = sum(s["policy_flops"] for s in samples) + bon["reward_flops"] * len(samples) / len(bon["samples"])
    return _bon_select(samples, selection), flops + bon["question_charge"]


def probe_of(bon: dict[str, Any], k: int) -> tuple[float, float]:
    """(statistic: mean last-step score of the first k samples, FLOPs of drawing and scoring them)."""
    samples = bon["samples"][:k]
    stat = sum(s["last"] for s in samples) / len(samples)
    return stat, bon_outcome(bon, k, "weighted")[1]


def outcomes(rec: dict[str, dict[str, Any]], configs: Sequence[Config]) -> dict[str, tuple[bool, float]]:
    """Per config key: (correct, FLOPs) for one problem."""
    out: dict[str, tuple[bool, float]] = {}
    for c in configs:
        if c.strategy == "best_of_n":
            out[c.key] = bon_outcome(rec["bon"], c.params_dict["n"], c.params_dict["selection"])
        elif c.key in rec:
            out[c.key] = (bool(rec[c.key]["correct"]), float(rec[c.key]["flops"]))
    return out


def generation_flops(recs: Iterable[dict[str, dict[str, Any]]]) -> dict[str, float]:
    """The budget unit: mean FLOPs of one best-of-N sample (policy decode + its share of the reward call), and the
    mean per-request question prefill charge. Budget of g generations = g * per_generation + question_charge."""
    pol, rew, n, charge, problems = 0.0, 0.0, 0, 0.0, 0
    for rec in recs:
        b = rec["bon"]
        pol += sum(s["policy_flops"] for s in b["samples"])
        rew += b["reward_flops"]
        n += len(b["samples"])
        charge += b["question_charge"]
        problems += 1
    return {"per_generation": (pol + rew) / n, "policy": pol / n, "reward": rew / n, "samples": n,
            "question_charge": charge / max(1, problems)}


def budget_flops(g: float, gen: dict[str, float]) -> float:
    """A budget of g generations in FLOPs; `estimation` (the difficulty estimate's mean cost, when the table's
    estimator pays one outside best-of-N's own samples) is part of every budget level, so `auto` at a level runs the
    level's configuration and its estimate."""
    return g * gen["per_generation"] + gen.get("question_charge", 0.0) + gen.get("estimation", 0.0)


# ---- building the table --------------------------------------------------------------------------------------------

def build_table(ids: Sequence[str], recs: dict[str, dict[str, dict[str, Any]]], configs: Sequence[Config], k: int,
                budgets_gen: Sequence[int], gen: dict[str, float], reward_backend: str, estimator: str = "probe",
                seed: int = 0) -> PolicyTable:
    from ..router.difficulty import PromptDifficultyModel

    stats = {i: probe_of(recs[i]["bon"], k)[0] for i in ids}
    cuts = quantile_cuts(list(stats.values()))
    table = PolicyTable(cuts=cuts, entries=[], reward_backend=reward_backend, estimator=estimator,
                        probe={"k": k, "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS})
    table.prompt_model = PromptDifficultyModel.fit([recs[i]["bon"]["question"] for i in ids],
                                                   [stats[i] for i in ids]).to_dict()
    table.budgets = [{"generations": g, "flops": budget_flops(g, gen)} for g in budgets_gen]
    outs = {i: outcomes(recs[i], configs) for i in ids}
    for b in range(1, N_BINS + 1):
        members = [i for i in ids if table.bin_of(stats[i]) == b]
        if not members:
            continue
        ran = [c for c in configs if all(c.key in outs[i] for i in members)]
        mean_cost = {c.key: sum(outs[i][c.key][1] for i in members) / len(members) for c in ran}
        for g in budgets_gen:
            # Matched FLOPs: a config competes at a budget when its mean measured FLOPs in this bin fit it.
            cands = [c for c in ran if mean_cost[c.key] <= budget_flops(g, gen) * 1.0001]
            if not cands:
                continue
            correct = {c.key: [float(outs[i][c.key][0]) for i in members] for c in cands}
            cost = {c.key: mean_cost[c.key] for c in cands}
            key, cv = select_by_cv(correct, cost, seed=seed + 31 * b + g)
            cfg = next(c for c in cands if c.key == key)
            table.entries.append({"bin": b, "budget_generations": g, "budget_flops": budget_flops(g, gen),
                                  "strategy": cfg.strategy, "params": cfg.params_dict, "expected_accuracy": cv,
                                  "in_bin_accuracy": sum(correct[key]) / len(members), "mean_flops": cost[key],
                                  "n_problems": len(members)})
    # Bins without calibration problems (tiny splits, ties in the statistic) borrow the nearest bin's entries.
    have = sorted({e["bin"] for e in table.entries})
    for b in range(1, N_BINS + 1):
        if have and b not in have:
            src = min(have, key=lambda h: (abs(h - b), h))
            table.entries += [{**e, "bin": b, "filled_from_bin": src, "n_problems": 0}
                              for e in table.entries if e["bin"] == src]
    table.entries.sort(key=lambda e: (e["bin"], e["budget_flops"]))
    return table


def route(table: PolicyTable, rec: dict[str, dict[str, Any]], budget_flops: float, configs: Sequence[Config],
          estimator: str | None = None) -> dict[str, Any]:
    """What `auto` does on one problem (from its recorded runs): estimate the bin, look the strategy up, run it.

    probe: the k probe samples are the first k of the best-of-16 draw; their FLOPs count. A best-of-n choice reuses
    them (n <= k: vote over the k probe samples; n > k: the first n samples). When even the probe does not fit the
    budget, the prompt estimator decides instead (no FLOPs).
    """
    from ..router.difficulty import prompt_bin

    k = int(table.probe["k"])
    bon = rec["bon"]
    stat, probe_flops = probe_of(bon, k)
    # The served rule (router.table.uses_probe / choose), on recorded samples instead of live calls.
    probe_bin, left = None, budget_flops
    if uses_probe(estimator or table.estimator, True, probe_flops <= budget_flops):
        probe_bin, left = table.bin_of(stat), budget_flops - probe_flops + bon["question_charge"]
    else:
        probe_flops = 0.0
    question_bin = prompt_bin(table, bon["question"]) if probe_bin is None and table.prompt_model else None
    used, b, choice = choose(table, left, probe_bin, question_bin)
    key = config_key(choice.strategy, choice.params)
    if choice.strategy == "best_of_n":
        n = int(choice.params["n"])
        if used == "probe":
            n = max(n, k)
        correct, flops = bon_outcome(bon, n, choice.params.get("selection", "weighted"))
    else:
        outs = outcomes(rec, [c for c in configs if c.key == key])
        if key not in outs:
            raise KeyError(f"no recorded run of {key} for problem {bon['id']}")
        correct, flops = outs[key]
        if probe_flops:
            flops += probe_flops - bon["question_charge"]  # the question is prefilled once per request
    return {"correct": bool(correct), "flops": flops, "bin": b, "key": key, "estimator": used}


def choose_estimator(ids: Sequence[str], recs: dict[str, dict[str, dict[str, Any]]], configs: Sequence[Config],
                     budgets_gen: Sequence[int], gen: dict[str, float], reward_backend: str,
                     seed: int = 0) -> tuple[str, int, dict[str, Any]]:
    """2-fold CV on the calibration problems: build the table on one half, route the other half with each
    (estimator, probe k), both ways. Score = mean accuracy over the budget grid (matched budgets)."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    folds = (order[: len(order) // 2], order[len(order) // 2:])
    report: dict[str, Any] = {}
    for k in PROBE_KS:
        for est in ("probe", "prompt"):
            accs, flops = [], []
            for g in budgets_gen:
                hits, spent, n = 0, 0.0, 0
                for a, b in ((0, 1), (1, 0)):
                    t = build_table(folds[a], recs, configs, k, budgets_gen, gen, reward_backend, est, seed)
                    for i in folds[b]:
                        r = route(t, recs[i], budget_flops(g, gen), configs)
                        hits += r["correct"]
                        spent += r["flops"]
                        n += 1
                accs.append(hits / n)
                flops.append(spent / n)
            report[f"{est}_k{k}"] = {"accuracy": accs, "mean_flops": flops, "budget_generations": list(budgets_gen),
                                     "mean_accuracy": sum(accs) / len(accs)}
    best = max(report, key=lambda name: (report[name]["mean_accuracy"], name.startswith("prompt")))
    est, _, k = best.partition("_k")
    return est, int(k), report


# ---- CLI -----------------------------------------------------------------------------------------------------------



def rescore(rec: dict[str, dict[str, Any]], backend: str) -> dict[str, dict[str, Any]]:
    """One problem's best-of-N draw as if `backend` had scored it (calibrate records every backend's last-step
    score per sample); search runs are dropped, since their paths depended on the backend that guided them. The
    calculator and the policy's own confidence cost no FLOPs, so a draw scored only by them carries no reward FLOPs."""
    bon = dict(rec["bon"])
    bon["samples"] = [dict(s, last=s["last_by"][backend]) for s in bon["samples"]]
    if "prm" not in backend.split("*"):
        bon["reward_flops"] = 0.0
    return {"bon": bon}
