"""`ttc-gateway bench`: fixed strategies vs `auto` (difficulty estimate + policy-table lookup) at matched FLOPs.

Bench problems are the seeded pool of the given datasets (calibrate's `load_pool`) minus every problem id the table
was calibrated on. Every config runs once per problem on real workers (per-problem results cached as JSONL, shared
with calibrate's cache when --work-dir points at it); best-of-N at N = 1..16 uses the first N samples of one n=16 draw.
`auto` is then evaluated from those recorded runs: the probe IS the first k samples of that draw (its FLOPs counted),
the table picks a strategy for the remaining budget, and that strategy's recorded run on the same problem is its
outcome (best-of-N reuses the probe samples). FLOPs accounting: see service/offline/calibrate.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .workers import add_worker_args, gateway_settings
from .calibrate import (
    LEAN_GRID,
    SEARCH_GRID,
    TINY_GRID,
    bon_configs,
    bon_size,
    cached_records,
    complete_ids,
    load_pool,
    run_grid,
)
from .fit import BON_N, Config, budget_flops, config_key, outcomes, probe_of, route
from .bench_checks import difficulty_markdown, difficulty_vs_levels, revisions_harm
from ..router.table import N_BINS, PolicyTable, load


def family(cfg: Config) -> str:
    p = {k: v for k, v in cfg.params_dict.items() if k != "n"}
    return cfg.strategy + (" " + " ".join(f"{k}={p[k]}" for k in sorted(p)) if p else "")


def curves(ids: Sequence[str], recs: dict[str, Any], configs: Sequence[Config], table: PolicyTable,
           budgets: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if not ids:
        return out
    outs = {i: outcomes(recs[i], configs) for i in ids}
    for c in configs:
        if not all(c.key in outs[i] for i in ids):
            continue
        acc = sum(outs[i][c.key][0] for i in ids) / len(ids)
        fl = sum(outs[i][c.key][1] for i in ids) / len(ids)
        out.setdefault(family(c), []).append({"key": c.key, "generations": c.generations, "accuracy": acc,
                                              "mean_flops": fl, "n": len(ids)})
    for est in ("probe", "prompt"):
        name = f"auto ({est})" + (" [table]" if est == table.estimator else "")
        pts = []
        for b in budgets:
            routed = [route(table, recs[i], b["flops"], configs, est) for i in ids]
            pts.append({"generations": b["generations"], "budget_flops": b["flops"],
                        "accuracy": sum(r["correct"] for r in routed) / len(ids),
                        "mean_flops": sum(r["flops"] for r in routed) / len(ids), "n": len(ids),
                        "over_budget": sum(r["flops"] > b["flops"] for r in routed),
                        "choices": _count(r["key"] for r in routed)})
        out[name] = pts
    for pts in out.values():
        pts.sort(key=lambda p: p["mean_flops"])
    return out


def live_curve(ids: Sequence[str], recs: dict[str, Any], live: Sequence[Config],
               gen: dict[str, float]) -> list[dict[str, Any]]:
    pts = []
    for c in live:
        runs = [recs[i][c.key] for i in ids]
        cap = budget_flops(c.generations, gen) * 1.0001
        pts.append({"generations": c.generations, "budget_flops": budget_flops(c.generations, gen),
                    "accuracy": sum(bool(r["correct"]) for r in runs) / len(runs),
                    "mean_flops": sum(float(r["flops"]) for r in runs) / len(runs), "n": len(runs),
                    "over_budget": sum(float(r["flops"]) > cap for r in runs),
                    "choices": _count(str(r.get("choice", {}).get("strategy")) for r in runs)})
    return pts


def _count(xs: Any) -> dict[str, int]:
    d: dict[str, int] = {}
    for x in xs:
        d[x] = d.get(x, 0) + 1
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def flops_to_reach(points: Sequence[dict[str, Any]], target: float) -> float | None:
    """Smallest FLOPs at which the curve (sorted by FLOPs, linear in log-FLOPs between points) reaches `target`."""
    pts = sorted(points, key=lambda p: p["mean_flops"])
    for j, p in enumerate(pts):
        if p["accuracy"] >= target - 1e-12:
            if j == 0 or pts[j - 1]["accuracy"] >= p["accuracy"]:
                return p["mean_flops"]
            a, b = pts[j - 1], p
            # Only interpolate from a point below the target.
            if a["accuracy"] >= target:
                return a["mean_flops"]
            t = (target - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
            return math.exp(math.log(a["mean_flops"]) + t * (math.log(b["mean_flops"]) - math.log(a["mean_flops"])))
    return None


def efficiency(cv: dict[str, list[dict[str, Any]]], auto_name: str, base: str = "best_of_n selection=weighted"
               ) -> dict[str, Any]:
    pts = cv[base]
    best = max(p["accuracy"] for p in pts)
    f_base = min(p["mean_flops"] for p in pts if p["accuracy"] >= best)
    f_auto = flops_to_reach(cv[auto_name], best)
    return {"baseline": base, "auto": auto_name, "target_accuracy": best, "baseline_flops": f_base,
            "auto_flops": f_auto, "ratio": (f_base / f_auto) if f_auto else None}


def markdown(cv: dict[str, list[dict[str, Any]]], gens: Sequence[int], gen: dict[str, float], n: int,
             eff: list[dict[str, Any]], reward: str) -> str:
    gen_flops = gen["per_generation"]
    lines = [f"Bench: {n} held-out problems, reward `{reward}`, 1 generation = {gen_flops:.3g} FLOPs (one best-of-N "
             f"sample, policy + reward). Budget B = B generations + one question prefill "
             f"({gen.get('question_charge', 0.0):.2g} FLOPs). Cells: accuracy % "
             "(mean FLOPs) of the strategy's largest config whose mean FLOPs fit B; `auto` given B (probe "
             "included).", "",
             "| strategy | " + " | ".join(f"B = {g} gen ({budget_flops(g, gen):.2g})" for g in gens) + " |",
             "|---|" + "---|" * len(gens)]
    for name, pts in cv.items():
        cells = []
        for g in gens:
            if name.startswith("auto"):
                p = next((p for p in pts if p["generations"] == g), None)
            else:
                fit = [p for p in pts if p["mean_flops"] <= budget_flops(g, gen) * 1.0001]
                p = max(fit, key=lambda p: p["mean_flops"]) if fit else None
            cells.append(f"{100 * p['accuracy']:.1f} ({p['mean_flops']:.2g})" if p else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for e in eff:
        if e["ratio"] is None:
            lines.append(f"Efficiency ({e['auto']} vs {e['baseline']}): best-of-N weighted peaks at "
                         f"{100 * e['target_accuracy']:.1f}% with {e['baseline_flops']:.3g} FLOPs; auto: not reached.")
        else:
            lines.append(f"Efficiency ({e['auto']} vs {e['baseline']}): {e['ratio']:.2f}x "
                         f"({e['baseline_flops']:.3g} vs {e['auto_flops']:.3g} FLOPs to reach "
                         f"{100 * e['target_accuracy']:.1f}%).")
    return "\n".join(lines) + "\n"


def plot(cv: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    _draw(ax, cv)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(ax: Any, cv: dict[str, list[dict[str, Any]]]) -> None:
    for name, pts in cv.items():
        if not pts:
            continue
        style = dict(lw=2.5, marker="s") if name.startswith("auto") else dict(lw=1.2, marker="o", ms=3)
        ax.plot([p["mean_flops"] for p in pts], [100 * p["accuracy"] for p in pts], label=name, **style)
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per problem")
    ax.set_ylabel("accuracy %")
    ax.grid(alpha=0.3)


def plot_bins(per_bin: dict[int, dict[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, N_BINS, figsize=(4 * N_BINS, 4), sharey=True)
    for b in range(1, N_BINS + 1):
        ax = axes[b - 1]
        cv = per_bin.get(b, {})
        _draw(ax, cv)
        n = next((p["n"] for pts in cv.values() for p in pts), 0)
        ax.set_title(f"bin {b} (n={n})")
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def backend_report(backend: str, cal_ids: Sequence[str], cal_recs: dict[str, Any], ids: Sequence[str],
                   recs: dict[str, Any], budgets_gen: Sequence[int], out: Path, gens_shown: Sequence[int]) -> str:
    """Best-of-N (weighted, majority) and a best-of-N-only `auto` for another reward backend, from the same draws
    rescored (no new samples): its own budget unit, difficulty cuts and table, fitted on the calibration problems."""
    from .fit import build_table, choose_estimator, generation_flops, rescore

    cal_b = {i: rescore(cal_recs[i], backend) for i in cal_ids}
    bench_b = {i: rescore(recs[i], backend) for i in ids}
    configs = bon_configs(BON_N)
    gen = generation_flops(cal_b.values())
    est, k, _ = choose_estimator(cal_ids, cal_b, configs, budgets_gen, gen, backend)
    table = build_table(cal_ids, cal_b, configs, k, budgets_gen, gen, backend, est)
    cv = curves(ids, bench_b, configs, table, table.budgets)
    eff = [efficiency(cv, a) for a in cv if a.startswith("auto")]
    md = markdown(cv, gens_shown, gen, len(ids), eff, backend + " (best-of-N draws rescored; no step search)")
    tag = backend.replace("*", "x")
    (out / f"bench_{tag}.md").write_text(md)
    (out / f"results_{tag}.json").write_text(json.dumps({"reward_backend": backend, "rescored": True, "curves": cv,
                                                        "generation_flops": gen, "efficiency": eff,
                                                        "estimator": est, "probe_k": k}, indent=1) + "\n")
    plot(cv, out / f"accuracy_vs_flops_{tag}.png", f"{len(ids)} held-out problems, reward {backend} (rescored)")
    return md


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="fixed strategies vs auto (router) at matched FLOPs on held-out problems")
    p.add_argument("--dataset", action="append", required=True, help="JSONL file (path or path:weight); repeatable")
    p.add_argument("--limit", type=int, required=True, help="bench problems (not calibrated on)")
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True, help="output directory (results.json, PNGs, bench.md)")
    p.add_argument("--work-dir", default="", help="per-problem results cache (default OUT/work)")
    p.add_argument("--grid", default="full", choices=("full", "lean", "tiny"))
    p.add_argument("--live-auto", action="store_true",
                   help="also run `auto` for real (probe, table lookup, strategy) at the shown budgets")
    p.add_argument("--backends", default="",
                   help="other reward backends to report from the same best-of-N draws, e.g. arith,prm")
    add_worker_args(p)
    p.set_defaults(func=main)


def main(settings: Any, args: argparse.Namespace) -> int:
    table = load(args.table)
    calibrated = set(table.calibration.get("problem_ids", []))
    rows = [r for r in load_pool(args.dataset, args.seed) if r["id"] not in calibrated][: args.limit]
    gens = [int(b["generations"]) for b in table.budgets]
    search = {"full": SEARCH_GRID, "lean": LEAN_GRID, "tiny": TINY_GRID}[args.grid]
    configs = bon_configs(min(BON_N, max(gens))) + list(search)
    known = {c.key for c in configs}
    for e in table.entries:  # every strategy the table can choose must have been run
        key = config_key(e["strategy"], e["params"])
        if key not in known:
            configs.append(Config(e["strategy"], tuple(sorted(e["params"].items())), int(e["budget_generations"])))
            known.add(key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gws = gateway_settings(args.reward, args.policy_port, args.reward_port, args.policy_url, args.reward_url)
    t0 = time.monotonic()

    shown = [g for g in (4, 16, 64) if g in gens] or gens
    live = [Config("auto", (("budget_generations", g),), g) for g in shown] if args.live_auto else []
    recs = run_grid(gws, Path(args.work_dir or out / "work"), args.reward, args.concurrency,
                    max(bon_size(gens), int(table.probe.get("k", 4))), rows,
                    [c for c in configs if c.strategy != "best_of_n"] + live, "bench", table=table)
    run_s = time.monotonic() - t0
    ids = complete_ids(rows, recs, "bench")
    assert not calibrated & set(ids)
    gen = dict(table.generation_flops)
    cv = curves(ids, recs, configs, table, table.budgets)
    if live:  # the served code path (real probe, lookup, strategy under the budget), next to the replay
        cv["auto (live)"] = live_curve(ids, recs, live, gen)
    k = int(table.probe["k"])
    per_bin = {}
    bins = {i: table.bin_of(probe_of(recs[i]["bon"], k)[0]) for i in ids}
    for b in range(1, N_BINS + 1):
        members = [i for i in ids if bins[i] == b]
        per_bin[b] = curves(members, recs, configs, table, table.budgets) if members else {}
    autos = [name for name in cv if name.startswith("auto")]
    eff = [efficiency(cv, a) for a in autos]
    md = markdown(cv, shown, gen, len(ids), eff, args.reward)
    # The same comparison per kind of problem: arith_graded (levels given) and the word-problem splits.
    per_source = {}
    for label, members in (("arith_graded", [i for i in ids if recs[i]["bon"].get("source") == "arith_graded"]),
                           ("word problems", [i for i in ids if recs[i]["bon"].get("source") != "arith_graded"])):
        if not members:
            continue
        cv_s = curves(members, recs, configs, table, table.budgets)
        if live:
            cv_s["auto (live)"] = live_curve(members, recs, live, gen)
        per_source[label] = cv_s
        md += "\n" + markdown(cv_s, shown, gen, len(members), [efficiency(cv_s, a) for a in cv_s
                                                                if a.startswith("auto")], f"{args.reward}, {label}")
    tag = args.reward.replace("*", "x")
    results = {"reward_backend": args.reward, "table": str(args.table), "table_estimator": table.estimator,
               "problems": len(ids), "problem_ids": ids, "datasets": args.dataset, "seed": args.seed,
               "generation_flops": gen, "budgets": table.budgets, "curves": cv,
               "per_bin": {str(b): v for b, v in per_bin.items()}, "per_source": per_source,
               "bin_sizes": {str(b): sum(1 for i in ids if bins[i] == b) for b in range(1, N_BINS + 1)},
               "efficiency": eff, "run_seconds": round(run_s)}
    cal_ids = [i for i in table.calibration.get("problem_ids", [])]
    cal_recs = cached_records(Path(args.work_dir or out / "work"), args.reward, cal_ids)
    results["difficulty_vs_levels"] = difficulty_vs_levels(list(cal_recs) + ids, {**cal_recs, **recs}, table,
                                                           set(ids))
    md += difficulty_markdown(results["difficulty_vs_levels"])
    harm = results["revisions_harm"] = revisions_harm({**cal_recs, **recs})
    if harm["revisions"]:
        rate = harm["correct_to_wrong_rate"]
        md += (f"\nRevisions ({harm['runs']} runs, {harm['revisions']} revisions): {harm['from_correct']} revised a "
               f"correct answer, {harm['correct_to_wrong']} of them made it wrong"
               + (f" ({100 * rate:.0f}%)" if rate is not None else "")
               + f"; {harm['wrong_to_correct']} turned a wrong answer right.\n")
    (out / f"results_{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"bench_{tag}.md").write_text(md)
    for backend in [b for b in args.backends.split(",") if b and b != args.reward]:
        if not cal_recs:
            print(f"[bench] skipping {backend}: no calibration records in the work dir (pass calibrate's --work-dir)")
            continue
        if not all(backend in s.get("last_by", {}) for r in (cal_recs, recs) for i in r
                   for s in r[i]["bon"]["samples"]):
            print(f"[bench] skipping {backend}: the recorded draws carry no {backend} scores")
            continue
        print(backend_report(backend, list(cal_recs), cal_recs, ids, recs, gens, out,
                             [g for g in (4, 16, 64) if g in gens] or gens))
    plot(cv, out / f"accuracy_vs_flops_{tag}.png", f"{len(ids)} held-out problems, reward {args.reward}")
    plot_bins(per_bin, out / f"accuracy_by_bin_{tag}.png", f"per difficulty bin (probe k={k}), reward {args.reward}")
    print(md)
    print(f"wrote {out}/results_{tag}.json, bench_{tag}.md, accuracy_vs_flops_{tag}.png, accuracy_by_bin_{tag}.png; "
          f"run {run_s:.0f} s")
    return 0
