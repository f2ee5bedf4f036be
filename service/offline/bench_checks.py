"""Checks `bench` adds to the accuracy-vs-FLOPs curves, all from recorded runs (no workers): the router's
difficulty bins against the levels `arith_graded` gives, and how often a revision broke a correct answer."""

from __future__ import annotations

from typing import Any, Sequence

from .fit import probe_of
from ..router.table import PolicyTable


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):  # ties share their mean rank
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    import numpy as np

    if len(a) < 3:
        return None
    ra, rb = np.array(_ranks(a)), np.array(_ranks(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def difficulty_vs_levels(ids: Sequence[str], recs: dict[str, Any], table: PolicyTable,
                         held_out: set[str]) -> dict[str, Any]:
    """The router's difficulty bins against the levels arith_graded gives (never used in calibration): Spearman's
    rho of level vs bin (positive = harder levels land in harder bins), and per level the mean bins and the
    per-sample accuracy of the best-of-N draw (the ground truth of "hard" for this model)."""
    from ..router.difficulty import prompt_bin

    k = int(table.probe["k"])
    rows = []
    for i in ids:
        bon = recs[i]["bon"]
        if bon.get("level") is None:
            continue
        rows.append({"id": i, "level": int(bon["level"]), "probe_bin": table.bin_of(probe_of(bon, k)[0]),
                     "prompt_bin": prompt_bin(table, bon["question"]), "held_out": i in held_out,
                     "sample_accuracy": sum(s["correct"] for s in bon["samples"]) / len(bon["samples"])})
    out: dict[str, Any] = {"problems": len(rows)}
    if not rows:
        return out
    lv = [r["level"] for r in rows]
    out["rho_level_probe_bin"] = spearman(lv, [r["probe_bin"] for r in rows])
    out["rho_level_sample_accuracy"] = spearman(lv, [-r["sample_accuracy"] for r in rows])
    ho = [r for r in rows if r["held_out"]]
    out["held_out_problems"] = len(ho)
    out["rho_level_prompt_bin_held_out"] = spearman([r["level"] for r in ho], [r["prompt_bin"] for r in ho])
    out["levels"] = {}
    for level in sorted(set(lv)):
        group = [r for r in rows if r["level"] == level]
        out["levels"][str(level)] = {
            "n": len(group), "mean_probe_bin": sum(r["probe_bin"] for r in group) / len(group),
            "mean_prompt_bin": sum(r["prompt_bin"] for r in group) / len(group),
            "sample_accuracy": sum(r["sample_accuracy"] for r in group) / len(group)}
    return out


def difficulty_markdown(d: dict[str, Any]) -> str:
    if not d.get("problems"):
        return ""
    fmt = lambda x: "n/a" if x is None else f"{x:+.2f}"  # noqa: E731
    lines = ["", f"Difficulty bins vs the given levels ({d['problems']} `arith_graded` problems, calibration and "
             f"held-out; levels never enter calibration): Spearman rho(level, probe bin) = "
             f"{fmt(d['rho_level_probe_bin'])}, rho(level, prompt-estimator bin) = "
             f"{fmt(d['rho_level_prompt_bin_held_out'])} on the {d['held_out_problems']} held-out ones, "
             f"rho(level, sample error rate) = {fmt(d['rho_level_sample_accuracy'])}.", "",
             "| level | problems | mean probe bin | mean prompt bin | per-sample accuracy % |", "|---|---|---|---|---|"]
    for level, g in d["levels"].items():
        lines.append(f"| {level} | {g['n']} | {g['mean_probe_bin']:.2f} | {g['mean_prompt_bin']:.2f} | "
                     f"{100 * g['sample_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def revisions_harm(recs: dict[str, Any]) -> dict[str, Any]:
    """How often a revision turned a correct answer wrong (Snell et al. report ~38% for their revision model), over
    every recorded revisions run that kept its chains of answers."""
    from ..strategies.revisions import count_correct_to_wrong

    c2w = w2c = from_correct = total = runs = 0
    for rec in recs.values():
        for key, run in rec.items():
            if key.startswith("revisions:") and run.get("chains"):
                t = count_correct_to_wrong(run["chains"], run["gold"])
                c2w, w2c = c2w + t.correct_to_wrong, w2c + t.wrong_to_correct
                from_correct, total, runs = from_correct + t.from_correct, total + t.revisions, runs + 1
    return {"runs": runs, "revisions": total, "from_correct": from_correct, "correct_to_wrong": c2w,
            "wrong_to_correct": w2c, "correct_to_wrong_rate": c2w / from_correct if from_correct else None}
