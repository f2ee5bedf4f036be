"""`ttc-gateway replay`: everything the sample bank can say without new samples, with bootstrap 95% intervals.

1. Every best-of-N configuration (N, selection, aggregation, backend): accuracy and mean FLOPs, averaged over R random
   orderings per problem.
2. Snell's compute-optimal policy by oracle difficulty (pass@1 bins) and by predicted difficulty (bins of the mean
   verifier score of the bank's samples; its cost is not counted, as in Snell et al.), each 2-fold cross-validated
   inside its bins, with its efficiency ratio over best-of-N weighted and predicted / oracle.
3. The evidence table (offline.policy.evidence_table), fitted on the problems outside the stable held-out split
   (bank.is_held_out, a hash of the id) and evaluated on the held-out ones, written in the router's table format;
   its prior by cross-validation (offline.policy.cv_prior). Every request it routes, and the best fixed
   configuration it is compared with, is held to its budget (offline.policy.served_config).
   With a zero-decode difficulty head (`--difficulty-head`, from `ttc-gateway train-difficulty`), the table's bins
   are the head's predictions and the served `auto` is replayed with the head's one prefill paid, beside the probe.
4. Early stopping rules: samples saved and accuracy lost against the full best-of-16 on the same orderings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bank import BACKENDS, StaleBank, current_models, is_held_out, read_bank
from .policy import compute_optimal_cv, cv_prior, evidence_table, quantile_bins, table_outcomes
from .auto_replay import auto_outcomes, hidden_auto_outcomes
from .replay import (NS, BonConfig, all_configs, bank_arrays, bootstrap_weights,
                     ratio_with_interval, replay_orderings, with_intervals)
from .stopping import StoppingRule, replay_stopping

BUDGETS_GEN = (1, 2, 4, 8, 16)
RULES = (StoppingRule(0.95, hopeless_k=None), StoppingRule(0.95, hopeless_k=4, score_threshold=0.2),
         StoppingRule(0.8, hopeless_k=4, score_threshold=0.2))


def _fmt(x: float | None, digits: int = 3) -> Any:
    return None if x is None else round(float(x), digits)


def _ci(mean: float, lo: float, hi: float, scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    return {"mean": _fmt(mean * scale, digits), "lo": _fmt(lo * scale, digits), "hi": _fmt(hi * scale, digits)}


def _curve(acc: np.ndarray, fl: np.ndarray, w: np.ndarray) -> list[dict[str, Any]]:
    a, f = with_intervals(acc, w), with_intervals(fl, w)
    return [{"accuracy": _ci(a["mean"][j], a["lo"][j], a["hi"][j]), "flops": _ci(f["mean"][j], f["lo"][j],
                                                                                 f["hi"][j], digits=-1)}
            for j in range(acc.shape[1])]


def _ratio(r: dict[str, Any]) -> dict[str, Any]:
    return {k: _fmt(v) if isinstance(v, float) else v for k, v in r.items()}


def evaluate(header: dict[str, Any], problems: Sequence[dict[str, Any]], backend: str = "prm*arith", r: int = 128,
             n_boot: int = 1000, seed: int = 0, holdout: float = 0.3, prior_strength: float | None = None,
             min_gain: float = 0.005, stopping: Sequence[StoppingRule] = (),
             hidden: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """(report, the evidence table fitted on the non-held-out problems). `stopping`: early-stopping rules added to
    the grid inside best-of-N (all_configs), so the table may choose them; their params serve the same rule.

    hidden: the zero-decode head's {"prediction": {id: value}, "encode_flops": {id: FLOPs}, "path", "version"};
    the table is then fitted on its predictions (estimator "hidden") and its served `auto` pays the encode FLOPs."""
    from .fit import budget_flops

    bank = bank_arrays(problems)
    P, S = bank.correct.shape
    ns = tuple(n for n in NS if n <= S // 2) or (1,)  # the bank must hold more samples than the largest N
    configs = all_configs(ns, rules=stopping)
    t0 = time.monotonic()
    ok_all, cost_all, order = replay_orderings(bank, configs, r=r, seed=seed)
    acc, fl = ok_all.mean(1), cost_all.mean(1)
    replay_s = time.monotonic() - t0
    w = bootstrap_weights(P, n_boot, seed)
    gen = bank.per_generation(backend)
    budgets = [budget_flops(g, gen) for g in BUDGETS_GEN]
    idx = {c.key: k for k, c in enumerate(configs)}
    base_k = [idx[BonConfig(n, "weighted", "last", backend).key] for n in ns]
    mine = [k for k, c in enumerate(configs) if c.selection == "majority" or c.backend == backend]
    report: dict[str, Any] = {"problems": P, "samples_per_problem": S, "orderings": r, "bootstrap": n_boot,
                              "seed": seed, "backend": backend, "models": header.get("models"),
                              "generation_flops": gen, "budgets_generations": list(BUDGETS_GEN),
                              "pass_at_1_mean": float(bank.pass_at_1.mean()),
                              "problems_without_correct_sample": int((~bank.correct.any(1)).sum()),
                              "replay_seconds": round(replay_s, 2)}
    curve = _curve(acc, fl, w)
    report["configs"] = {c.key: curve[k] for k, c in enumerate(configs)}
    base_a, base_f = acc[:, base_k], fl[:, base_k]

    policies: dict[str, Any] = {}
    pass1 = bank.pass_at_1
    verifier = bank.scores[(backend, "last")].mean(1)
    for name, stat in (("oracle", pass1), ("predicted", verifier)):
        _, bins = quantile_bins(stat)
        res = compute_optimal_cv(acc[:, mine], fl[:, mine], bins, budgets, seed)
        ratio = ratio_with_interval(base_a, base_f, res["accuracy"], res["flops"], w)
        policies[name] = {"curve": _curve(res["accuracy"], res["flops"], w), "ratio": _ratio(ratio),
                          "bin_sizes": np.bincount(bins, minlength=6)[1:].tolist()}
    ro, rp = policies["oracle"]["ratio"]["ratio"], policies["predicted"]["ratio"]["ratio"]
    report["policies"] = policies
    report["predicted_over_oracle"] = _fmt(rp / ro) if ro and rp else None

    # The evidence table: fitted on one share, evaluated on the held-out rest.
    held = np.array([is_held_out(i, holdout) for i in bank.ids])
    ho, fit = np.flatnonzero(held), np.flatnonzero(~held)
    n_ho = len(ho)
    cfgs = [configs[k] for k in mine]
    stat = verifier
    if hidden is not None:
        stat = np.array([float(hidden["prediction"][i]) for i in bank.ids])
        report["hidden_estimator"] = {"head": hidden.get("path"), "version": hidden.get("version"),
                                      "mean_encode_flops": float(np.mean(list(hidden["encode_flops"].values())))}
    stat_fit = stat[fit]
    if hidden is not None and hidden.get("fit_prediction"):
        stat_fit = np.array([float(hidden["fit_prediction"].get(bank.ids[i], stat[i])) for i in fit])
        report["hidden_estimator"]["table_fitted_on"] = "out-of-fold predictions (5 folds)"
    gen_table, budgets_table = gen, budgets
    if hidden is not None:  # the head's prefill is paid on top of the configuration: part of every budget level
        gen_table = dict(gen, estimation=report["hidden_estimator"]["mean_encode_flops"])
        budgets_table = [budget_flops(g, gen_table) for g in BUDGETS_GEN]
    prior_cv, prior = None, "scaled"
    if prior_strength is None:  # kind and strength chosen by 5-fold cross-validation on the fitted problems only
        prior, prior_strength, prior_cv = cv_prior(
            acc[fit][:, mine], fl[fit][:, mine], cfgs, stat_fit, bank.correct[fit].any(1), BUDGETS_GEN, gen_table,
            backend, budgets_table, seed=seed, min_gain=min_gain)
    table = evidence_table(acc[fit][:, mine], fl[fit][:, mine], cfgs, stat_fit, bank.correct[fit].any(1),
                           BUDGETS_GEN, gen_table, backend, prior_strength, min_gain,
                           questions=[bank.questions[i] for i in fit] if all(bank.questions) else None, prior=prior)
    if hidden is not None:
        table.estimator = "hidden"
        table.hidden_head = {"path": Path(str(hidden["path"])).name, "version": hidden["version"]}
    table.models = dict(header.get("models") or {})
    table.calibration.update({"problem_ids": [bank.ids[i] for i in fit], "held_out_ids": [bank.ids[i] for i in ho],
                              "source": "sample bank replay", "bank_created": header.get("created"),
                              "datasets": header.get("datasets")})
    if prior_cv is not None:
        table.calibration["prior_cv"] = {k: {m: round(x, 6) if isinstance(x, float) else x for m, x in v.items()}
                                         for k, v in prior_cv.items()}
    report["table"] = {"fitted_on": len(fit), "held_out": len(ho), "cuts": table.cuts, "prior": prior,
                       "prior_strength": prior_strength, "prior_cv": table.calibration.get("prior_cv"),
                       "entries": [{k: e[k] for k in ("bin", "budget_generations", "params", "expected_accuracy",
                                                      "n_problems", "hopeless")} for e in table.entries]}
    if n_ho:
        ta, tf = table_outcomes(table, acc[ho][:, mine], fl[ho][:, mine], cfgs, stat[ho], budgets_table)
        w_ho = bootstrap_weights(n_ho, n_boot, seed + 2)
        report["table"]["held_out_curve"] = _curve(ta, tf, w_ho)
        report["table"]["held_out_ratio"] = _ratio(ratio_with_interval(acc[ho][:, base_k], fl[ho][:, base_k], ta,
                                                                       tf, w_ho))
        if hidden is not None:
            # The served `auto` with the head: its bin needs one prefill (paid when it fits, as run_auto does).
            enc = np.array([float(hidden["encode_flops"][bank.ids[i]]) for i in ho])[:, None]
            fits = enc <= np.array(budgets_table)[None, :]
            aa, af = hidden_auto_outcomes(table, acc[ho][:, mine], fl[ho][:, mine], cfgs, stat[ho], enc[:, 0],
                                          budgets_table, [bank.questions[i] for i in ho])
            probe_share = fits.astype(float)
        else:
            aa, af, probe_share = auto_outcomes(table, bank, configs, ok_all, cost_all, order, budgets, ho)
        report["table"]["held_out_auto_curve"] = _curve(aa, af, w_ho)
        report["table"]["held_out_best_of_n_weighted_curve"] = _curve(acc[ho][:, base_k], fl[ho][:, base_k], w_ho)
        report["table"]["held_out_auto_probe_share"] = probe_share.mean(0).round(3).tolist()
        report["table"]["estimator"] = table.estimator
        report["table"]["auto_minus_best_fixed"] = minus_best_fixed(
            acc[fit][:, mine], fl[fit][:, mine], acc[ho][:, mine], fl[ho][:, mine], aa, cfgs, budgets_table, w_ho)
        report["table"]["held_out_by_source"] = by_source(
            [bank.sources[i] for i in ho], acc[ho][:, base_k[-1]], aa[:, -1])
        report["table"]["held_out_auto_ratio"] = _ratio(ratio_with_interval(acc[ho][:, base_k], fl[ho][:, base_k],
                                                                            aa, af, w_ho))
        ra = report["table"]["held_out_auto_ratio"]["ratio"]
        report["served_auto_over_oracle"] = _fmt(ra / ro) if ro and ra else None

    stops = {}
    n_max = max(ns)
    for rule in RULES:
        for sel in ("majority", "weighted"):
            out = replay_stopping(bank, rule, n_max=n_max, r=r, seed=seed, backend=backend, selection=sel)
            lost = with_intervals((out["full_accuracy"] - out["accuracy"])[:, None], w)
            stops[f"{sel} {rule.name}"] = {
                "accuracy": _fmt(out["accuracy"].mean(), 4), "full_accuracy": _fmt(out["full_accuracy"].mean(), 4),
                "accuracy_lost": _ci(lost["mean"][0], lost["lo"][0], lost["hi"][0]),
                "mean_samples": _fmt(out["samples"].mean(), 2),
                "samples_saved_ratio": _fmt(n_max / out["samples"].mean(), 2),
                "hopeless_share": _fmt(out["hopeless_share"].mean(), 3)}
    report["early_stopping"] = {"n_max": n_max, "rules": stops}
    return report, table


def minus_best_fixed(acc_fit: np.ndarray, fl_fit: np.ndarray, acc_ho: np.ndarray, fl_ho: np.ndarray,
                     auto_acc: np.ndarray, configs: Sequence[Any], budgets: Sequence[float], w_ho: np.ndarray
                     ) -> list[dict[str, Any]]:
    """Per budget: `auto` minus the best fixed configuration, on the held-out problems with a bootstrap interval.
    "Best fixed" is chosen where the table was fitted (highest accuracy among configs whose mean FLOPs fit the
    budget), so neither side is chosen on the problems it is scored on; like `auto`, it runs held to each request's
    budget (served_config). fl_ho: the held-out problems' FLOPs per config."""
    from .policy import config_index, served_config

    mean_acc, mean_fl = acc_fit.mean(0), fl_fit.mean(0)
    index = config_index(configs)
    out = []
    for j, g in enumerate(budgets):
        feasible = np.flatnonzero(mean_fl <= g)
        if not feasible.size:
            out.append({"budget_flops": g, "fixed": None})
            continue
        k = int(feasible[np.argmax(mean_acc[feasible])])
        served = [served_config(configs[k].params, index, fl_ho[i], g) for i in range(len(acc_ho))]
        fixed = np.array([acc_ho[i, kk] if kk is not None else 0.0 for i, kk in enumerate(served)])
        d = with_intervals((auto_acc[:, j] - fixed)[:, None], w_ho)
        out.append({"budget_flops": g, "fixed": configs[k].key,
                    "difference": _ci(d["mean"][0], d["lo"][0], d["hi"][0])})
    return out


def by_source(sources: Sequence[str], base: np.ndarray, auto_acc: np.ndarray) -> dict[str, Any]:
    """Held-out accuracy per dataset source at the largest budget: best-of-N weighted (largest N) and `auto`."""
    out = {}
    for src in sorted(set(sources)):
        rows = np.array([s == src for s in sources])
        out[src] = {"problems": int(rows.sum()), "best_of_n_weighted": _fmt(base[rows].mean(), 4),
                    "auto": _fmt(auto_acc[rows].mean(), 4)}
    return out


def markdown(rep: dict[str, Any]) -> str:
    pct = lambda c: f"{100 * c['mean']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"  # noqa: E731
    fl = lambda c: f"{c['mean']:.2e}"  # noqa: E731
    b = rep["backend"]
    lines = [f"Replay of a sample bank: {rep['problems']} problems x {rep['samples_per_problem']} samples, "
             f"{rep['orderings']} orderings per problem, 95% percentile bootstrap over problems ({rep['bootstrap']} "
             f"resamples). Verifier `{b}`; 1 generation = {rep['generation_flops']['per_generation']:.3g} FLOPs. "
             f"Mean pass@1 {100 * rep['pass_at_1_mean']:.1f}%; {rep['problems_without_correct_sample']} problems "
             f"have no correct sample.", "", "| config | " + " | ".join(f"N={n}" for n in NS) + " |",
             "|---|" + "---|" * len(NS)]
    for name, key in (("majority", "best_of_n:n={n},selection=majority"),
                      ("weighted (last)", f"best_of_n[{b}]:aggregation=last,n={{n}},selection=weighted"),
                      ("best (last)", f"best_of_n[{b}]:aggregation=last,n={{n}},selection=best")):
        cells = [rep["configs"].get(key.format(n=n)) for n in NS]
        lines.append(f"| {name} | " + " | ".join(f"{pct(c['accuracy'])} ({fl(c['flops'])})" if c else "-"
                                                 for c in cells) + " |")
    lines += ["", "| policy | " + " | ".join(f"B={g} gen" for g in rep["budgets_generations"]) +
              " | ratio over best-of-N weighted [95%] |", "|---|" + "---|" * (len(rep["budgets_generations"]) + 1)]
    rows = [("oracle bins (2-fold CV)", rep["policies"]["oracle"]),
            ("predicted bins (2-fold CV, estimation cost not counted)", rep["policies"]["predicted"])]
    if "held_out_curve" in rep["table"]:
        n_ho = rep["table"]["held_out"]
        rows.append((f"evidence table, {n_ho} held-out problems, bins known (no estimation cost)",
                     {"curve": rep["table"]["held_out_curve"], "ratio": rep["table"]["held_out_ratio"]}))
        how = ("zero-decode head's prefill cost included" if rep["table"].get("estimator") == "hidden"
               else "probe k=4 cost included")
        rows.append((f"`auto` with the evidence table, {n_ho} held-out problems, {how}",
                     {"curve": rep["table"]["held_out_auto_curve"], "ratio": rep["table"]["held_out_auto_ratio"]}))
    for name, pol in rows:
        r = pol["ratio"]
        ratio = "not reached" if r["ratio"] is None else f"{r['ratio']:.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]"
        lines.append(f"| {name} | " + " | ".join(f"{pct(p['accuracy'])} ({fl(p['flops'])})" for p in pol["curve"])
                     + f" | {ratio} (not reached in {100 * r['not_reached_share']:.0f}% of resamples) |")
    if rep["table"].get("prior_strength") is not None:
        cv = rep["table"].get("prior_cv")
        gen = rep["generation_flops"]["per_generation"]
        lines += ["", f"Evidence table fitted on {rep['table']['fitted_on']} problems, prior "
                      f"{rep['table'].get('prior', 'level')} of strength {rep['table']['prior_strength']:g}"
                      + (" (5-fold CV on them: among those within one standard error of the best, the strongest "
                         "prior, then the kind that spends less; "
                         "mean accuracy over budgets at mean generations spent: "
                         + "; ".join(f"{k}: {100 * v['accuracy']:.2f}% at {v['flops'] / gen:.2f}"
                                     + ("" if v["within_one_se"] else " (worse)") for k, v in cv.items())
                         + ")" if cv else "") + "."]
    diffs = rep["table"].get("auto_minus_best_fixed")
    if diffs:
        cell = lambda d: ("-" if not d.get("fixed") else  # noqa: E731
                          f"{100 * d['difference']['mean']:+.1f} [{100 * d['difference']['lo']:+.1f}, "
                          f"{100 * d['difference']['hi']:+.1f}]")
        lines += ["", "`auto` minus the best fixed configuration (chosen on the fitted problems), held-out, points "
                      "[95%]: " + ", ".join(f"B={g} gen {cell(d)}" for g, d in zip(rep["budgets_generations"], diffs))
                  + "."]
    src = rep["table"].get("held_out_by_source")
    if src:
        lines += ["", "Held out, by source, at the largest budget (best-of-N weighted N=max / `auto`): " + "; ".join(
            f"{k} ({v['problems']}): {100 * v['best_of_n_weighted']:.1f}% / {100 * v['auto']:.1f}%"
            for k, v in src.items()) + "."]
    lines += ["", f"Predicted / oracle efficiency: {rep['predicted_over_oracle']} (Snell's chooser on the verifier's "
                  f"mean); the served `auto` over the oracle: {rep.get('served_auto_over_oracle')}.", "",
              f"Early stopping inside best-of-{rep['early_stopping']['n_max']} (same orderings):", "",
              "| rule | accuracy % | full best-of-N % | lost, points [95%] | mean samples | saved |", "|---|---|---|---|---|---|"]
    for name, s in rep["early_stopping"]["rules"].items():
        lo = s["accuracy_lost"]
        lines.append(f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['full_accuracy']:.1f} | "
                     f"{100 * lo['mean']:.1f} [{100 * lo['lo']:.1f}, {100 * lo['hi']:.1f}] | {s['mean_samples']} | "
                     f"{s['samples_saved_ratio']}x |")
    return "\n".join(lines) + "\n"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="evaluate best-of-N, compute-optimal policies and early stopping on a bank")
    p.add_argument("--bank", required=True, help="sample bank written by `ttc-gateway bank`")
    p.add_argument("--out", required=True, help="folder for replay.json and replay.md")
    p.add_argument("--table-out", help="write the evidence table (router format) here")
    p.add_argument("--reward", default="prm*arith", choices=BACKENDS)
    p.add_argument("--orderings", type=int, default=128)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--holdout", type=float, default=0.3, help="share of problems held out of the table fit")
    p.add_argument("--prior-strength", type=float, default=None,
                   help="Beta prior strength (pseudo-problems), with the scaled prior; default: kind and strength "
                        "chosen by 5-fold CV on the fitted problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-stale", action="store_true", help="accept a bank from another model or PRM head")
    p.add_argument("--stopping", action="store_true",
                   help="let the table choose early stopping inside best-of-N (the Beta p>0.95 rules measured below)")
    p.add_argument("--difficulty-head", help="zero-decode head (.npz from `ttc-gateway train-difficulty`): fit the "
                                             "table on its predictions (estimator hidden)")
    p.add_argument("--features", help="the head's hidden-state cache (default: the bank path + "
                                                                 ".hidden-<layers>l.npz)")
    p.set_defaults(func=main)


def plot_replay(rep: dict[str, Any], path: Path) -> bool:
    """Accuracy vs mean FLOPs with 95% bands: best-of-N (majority, weighted) over N, and the routed policies over
    budgets. False when matplotlib is missing (the `bench` extra)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = rep["backend"]
    series: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
    for name, key in (("best-of-N majority", "best_of_n:n={n},selection=majority"),
                      (f"best-of-N weighted ({b})", f"best_of_n[{b}]:aggregation=last,n={{n}},selection=weighted")):
        pts = [rep["configs"][key.format(n=n)] for n in NS if key.format(n=n) in rep["configs"]]
        series.append((name, pts, dict(lw=1.2, marker="o", ms=3)))
    series += [("oracle bins (CV)", rep["policies"]["oracle"]["curve"], dict(lw=1.0, ls="--")),
               ("predicted bins (CV, cost free)", rep["policies"]["predicted"]["curve"], dict(lw=1.0, ls=":"))]
    t = rep.get("table", {})
    if "held_out_auto_curve" in t:
        series.append((f"auto, {t['held_out']} held out, estimation paid ({t.get('estimator', 'probe')})",
                       t["held_out_auto_curve"], dict(lw=2.5, marker="s")))
        series.append((f"best-of-N weighted, the same {t['held_out']} held out",
                       t["held_out_best_of_n_weighted_curve"], dict(lw=2.0, marker="^", ls="--")))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts, style in series:
        x = [q["flops"]["mean"] for q in pts]
        ax.plot(x, [100 * q["accuracy"]["mean"] for q in pts], label=name, **style)
        ax.fill_between(x, [100 * q["accuracy"]["lo"] for q in pts], [100 * q["accuracy"]["hi"] for q in pts],
                        alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per problem")
    ax.set_ylabel("accuracy % (95% bootstrap band)")
    ax.set_title(f"sample-bank replay: {rep['problems']} problems x {rep['samples_per_problem']} samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def hidden_inputs(args: argparse.Namespace, problems: Sequence[dict[str, Any]], settings: Any) -> dict[str, Any]:
    """The head's prediction and encode FLOPs per bank problem, from the features train-difficulty cached."""
    from ..gateway import check_head_layers, load_shape, reward_model
    from ..models.prm_head import PRMTokenizer
    from ..router.hidden_difficulty import HiddenDifficultyHead
    from .train_difficulty import load_features

    from ..config import Settings

    settings = settings or Settings()
    head = HiddenDifficultyHead.load(args.difficulty_head)
    if not Path(reward_model(settings)).is_dir():
        raise SystemExit(f"reward model folder {reward_model(settings)} missing: run `ttc-gateway prepare-models` "
                         f"(or set TTC_MODELS_DIR to where it was prepared)")
    shape = load_shape(reward_model(settings), settings.reward.config_path)
    try:
        check_head_layers(head.metadata.get("layers"), shape.n_layer, f"difficulty head {args.difficulty_head}",
                          reward_model(settings))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    feats = load_features(Path(args.features or f"{args.bank}.hidden-{shape.n_layer}l.npz"), head.poolings)
    missing = [p["id"] for p in problems if p["id"] not in feats]
    if missing:
        raise SystemExit(f"{len(missing)} bank problems have no cached {'+'.join(head.poolings)} hidden states "
                         f"(e.g. {missing[0]}): run `ttc-gateway train-difficulty --bank {args.bank} ...` first")
    tok = PRMTokenizer.from_model_dir(reward_model(settings)).tokenizer
    return {"path": args.difficulty_head, "version": head.version,
            "prediction": {p["id"]: float(head.predict_features(feats[p["id"]].astype(np.float64))[0])
                           for p in problems},
            # Callers outside replay (benchmarks replaying the shipped table) pass no split: the default one.
            "fit_prediction": fit_predictions(head, feats, problems, getattr(args, "holdout", 0.3)),
            "encode_flops": {p["id"]: shape.encode_flops(len(tok.encode(p["question"].strip(),
                                                                        add_special_tokens=False)))
                             for p in problems}}


def fit_predictions(head: Any, feats: dict[str, np.ndarray], problems: Sequence[dict[str, Any]],
                    holdout: float) -> dict[str, float]:
    """Out-of-fold predictions for the problems the table is fitted on, from heads refitted with the shipped head's
    label and ridge. The shipped head was fitted on these very problems, so its own predictions of them are better
    than what it says of a new problem; a table cut on those would trust its bins more than serving can."""
    from .train_difficulty import labels, out_of_fold

    fit = [p for p in problems if not is_held_out(p["id"], holdout)]
    label, ridge = head.metadata.get("label", "pass_at_1"), float(head.metadata.get("ridge", 1000.0))
    if len(fit) < 10:
        return {}
    X = np.stack([feats[p["id"]] for p in fit]).astype(np.float64)
    pred = out_of_fold(X, labels(fit)[label], ridge)
    return {p["id"]: float(v) for p, v in zip(fit, pred)}


def main(settings: Any, args: argparse.Namespace) -> int:
    header, problems = read_bank(args.bank)
    if not problems:
        raise SystemExit(f"sample bank {args.bank} holds no problem yet: run `ttc-gateway bank` to fill it")
    now = current_models(settings)
    if header.get("models") != now and not args.allow_stale:
        raise StaleBank(f"stale sample bank {args.bank}: drawn with {header.get('models')}, the gateway now has "
                        f"{now}; redraw it with `ttc-gateway bank` (or pass --allow-stale)")
    t0 = time.monotonic()
    hidden = hidden_inputs(args, problems, settings) if args.difficulty_head else None
    rep, table = evaluate(header, problems, args.reward, args.orderings, args.bootstrap, args.seed, args.holdout,
                          args.prior_strength, stopping=RULES[:2] if args.stopping else (), hidden=hidden)
    rep["run_seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(rep, indent=1, default=float) + "\n")
    (out / "replay.md").write_text(markdown(rep))
    plotted = plot_replay(rep, out / "replay.png")
    if args.table_out:
        table.save(args.table_out)
    print(markdown(rep))
    print(f"wrote {out / 'replay.json'}, {out / 'replay.md'}" + (f", {out / 'replay.png'}" if plotted else "")
          + (f", {args.table_out}" if args.table_out else "")
          + f" in {rep['run_seconds']} s")
    return 0
