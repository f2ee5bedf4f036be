"""`ttc-gateway bank`: the sample bank. Per problem, N_bank samples (default 32, twice the largest best-of-N that
replay evaluates, so that N = 16 still has sampling variance) from the real policy worker, every step of every sample
scored by every reward backend in the same pass, with tokens and FLOPs per sample and per role.

Storage: JSONL.gz, one gzip member per line. The first line is the header (policy model, PRM-head sha256, sampling
settings, the dataset mix); then one line per problem. Appending a member per problem makes the bank resumable (a
rerun skips the problems already in it) and a kill loses at most the problem in flight (a cut-off last member is
ignored on read). A problem line holds no dataset text (no question, no gold answer): only ids, per-sample answers,
correctness, scores, tokens and FLOPs. So the bank can live in the repository (benchmarks/results/) and grow across
sessions, while the questions are joined back from the datasets named in the header when a reader needs them.

Cost accounting is calibrate's (service/offline/calibrate.py docstring): the few-shot prefix is prefilled once by an unmetered
warm-up, each problem is charged the prefill of its question tokens (`question_charge`), each sample its decode
(`policy_flops`). The PRM scores all samples of a problem in one call; its measured FLOPs are split across samples in
proportion to their completion tokens (`reward_flops`). `arith` costs nothing; `prm*arith` is the step-wise product
of the two stored score lists (what rewards.combine.ProductReward computes), so it is derived on read, not stored.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

BANK_FORMAT = "ttc-sample-bank"
BANK_VERSION = 1
STORED_BACKENDS = ("arith", "prm")
BACKENDS = ("arith", "prm", "prm*arith")
N_BANK = 32
# Header fields that must match for a bank to be extended or trusted: the samples depend on all of them.
IDENTITY = ("models", "n_bank", "max_tokens", "temperature", "step_delimiter", "datasets", "seed")


class StaleBank(SystemExit):
    """A bank drawn with another model, PRM head or sampling settings (one line, for the CLI)."""


def step_scores(sample: dict[str, Any], backend: str) -> list[float]:
    if backend == "prm*arith":
        return [a * b for a, b in zip(sample["scores"]["prm"], sample["scores"]["arith"])]
    return list(sample["scores"][backend])


# ---- storage -------------------------------------------------------------------------------------------------------

def _append_line(path: Path, obj: dict[str, Any]) -> None:
    with gzip.open(path, "ab") as fh:  # one gzip member per line
        fh.write((json.dumps(obj, separators=(",", ":")) + "\n").encode())


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with gzip.open(path, "rb") as fh:
            for raw in fh:
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:  # a line cut off by a kill
                    return
    except (EOFError, gzip.BadGzipFile, zlib.error):  # a member cut off by a kill: keep what came before it
        return


HOLDOUT_SHARE = 0.3


def is_held_out(problem_id: str, share: float = HOLDOUT_SHARE) -> bool:
    """The stable split every fit respects (policy table, difficulty head): a hash of the id, so a problem stays on
    its side as the bank grows, and nothing fitted today has seen a problem that is held out tomorrow."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"holdout:{problem_id}".encode()).digest()[:8], "big")
    return h / 2**64 < share


# Dataset text a problem line must not carry (the bank is committed; the datasets are not).
DATASET_FIELDS = ("question", "gold")


def strip_dataset_text(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in DATASET_FIELDS}


def _dataset_path(spec: str, base: Path) -> str:
    """A header's dataset spec, resolved against the working directory first, then against the bank's folder's
    ancestors (a bank in benchmarks/results/ names ../shared/datasets/... relative to the repository)."""
    path, sep, weight = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "")
    if Path(path).is_file():
        return spec
    for parent in [base, *base.parents]:
        if (parent / path).is_file():
            return str(parent / path) + (sep + weight if sep else "")
    return spec


def attach_questions(path: Path, header: dict[str, Any], problems: list[dict[str, Any]]) -> int:
    """Join each problem's question (and gold answer) from the header's datasets; returns how many were found."""
    from .calibrate import load_pool

    specs = [_dataset_path(s, path.resolve().parent) for s in header.get("datasets") or []]
    try:
        rows = {r["id"]: r for r in load_pool(specs, header.get("seed", 20261123))} if specs else {}
    except (OSError, ValueError):  # datasets not on this machine: replay still works, the prompt model does not
        rows = {}
    found = 0
    for p in problems:
        row = rows.get(str(p["id"]))
        if row is not None:
            p.setdefault("question", row["question"])
            p.setdefault("gold", str(row["answer"]))
            found += 1
        else:
            p.setdefault("question", "")
    return found


def read_bank(path: str | Path, questions: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, problems); a problem id appearing twice keeps its last line. With `questions`, each problem gets its
    question joined from the datasets (empty when they are not found)."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"no sample bank at {p}: run `ttc-gateway bank --dataset ... --out {p}` first")
    it = _lines(p)
    header = next(it, None)
    if not header or header.get("format") != BANK_FORMAT:
        raise SystemExit(f"{p} is not a sample bank (no {BANK_FORMAT} header); rerun `ttc-gateway bank`")
    if header.get("format_version") != BANK_VERSION:
        raise StaleBank(f"{p}: bank format {header.get('format_version')}, this code reads {BANK_VERSION}; "
                        f"redraw it with `ttc-gateway bank`")
    problems: dict[str, dict[str, Any]] = {}
    for rec in it:
        problems[str(rec["id"])] = rec
    out = list(problems.values())
    if questions and any("question" not in rec for rec in out):
        attach_questions(p, header, out)
    return header, out


def check_identity(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a bank whose samples came from another model, PRM head or sampling settings."""
    diff = [k for k in IDENTITY if k in expected and found.get(k) != expected[k]]
    if diff:
        k = diff[0]
        raise StaleBank(f"stale sample bank {path}: {k} is {found.get(k)!r}, now {expected[k]!r}; "
                        f"draw a new bank (another --out) or delete this one")


def current_models(settings: Any = None) -> dict[str, Any]:
    """Policy model id and PRM-head hash as calibrate records them in a table's `models`."""
    from .workers import model_info
    from ..config import Settings

    return model_info(settings or Settings())


# ---- drawing -------------------------------------------------------------------------------------------------------

class BankRunner:
    def __init__(self, gw: Any, path: Path, header: dict[str, Any], concurrency: int = 2):
        from .calibrate import PromptRenderer

        self.gw, self.path, self.header = gw, path, header
        self.prompts = PromptRenderer(gw)
        self.sem = asyncio.Semaphore(concurrency)
        self.tokens = 0

    async def draw(self, row: dict[str, Any]) -> dict[str, Any]:
        from ..metering import Meter
        from ..rewards.arithmetic import ArithmeticReward
        from ..strategies.base import SamplingParams
        from ..strategies.steps import split_steps
        from ..strategies.voting import answers_equivalent, extract_answer
        from ..workers.policy import MeteredPolicy
        from ..workers.reward import MeteredPRM

        h = self.header
        async with self.sem:
            prompt, plen, shared = await self.prompts.render(row)
            shape = self.gw.policy.shape
            await MeteredPolicy(self.gw.policy, Meter()).generate(
                [prompt], SamplingParams(max_tokens=1, temperature=h["temperature"]), 1)  # warm-up, unmetered
            meter = Meter()
            t0 = time.monotonic()
            out = (await MeteredPolicy(self.gw.policy, meter).generate(
                [prompt], SamplingParams(max_tokens=h["max_tokens"], temperature=h["temperature"]), h["n_bank"]))[0]
            t_gen = time.monotonic() - t0
            steps = [split_steps(c.text, h["step_delimiter"]) for c in out]
            arith = await ArithmeticReward().score(row["question"], steps)
            prm = await MeteredPRM(self.gw.prm, meter, "bank").score(row["question"], steps)
        gold = str(row["answer"])
        total_tokens = sum(c.token_count for c in out) or 1
        samples = []
        for c, a, p, st in zip(out, arith, prm, steps):
            ans = extract_answer(c.text)
            # The steps themselves (model output, no dataset text) let a new verifier rescore the bank without
            # drawing it again.
            samples.append({"answer": ans, "correct": answers_equivalent(ans, gold), "tokens": c.token_count,
                            "steps": st,
                            "finish": c.finish_reason,
                            "policy_flops": shape.generation_flops(plen, plen, [c.token_count]),
                            "reward_flops": meter.reward.flops * c.token_count / total_tokens,
                            "scores": {"arith": [round(x, 4) for x in a], "prm": [round(x, 4) for x in p]}})
        self.tokens += sum(c.token_count for c in out)
        return {"id": str(row["id"]), "source": row.get("source"), "level": row.get("level"), "prompt_tokens": plen, "shared_tokens": shared,
                "question_charge": shape.forward_flops(plen - shared, shared),
                "policy": {"flops": meter.policy.flops, "completion_tokens": meter.policy.completion_tokens,
                           "prompt_tokens": meter.policy.prompt_tokens},
                "reward": {"flops": meter.reward.flops, "tokens": meter.reward.prompt_tokens,
                           "cached_tokens": meter.reward.cached_tokens},
                "generate_seconds": round(t_gen, 2), "seconds": round(time.monotonic() - t0, 2), "samples": samples}

    async def run(self, rows: Sequence[dict[str, Any]], every: int = 1) -> None:
        t0 = time.monotonic()
        done = 0

        async def one(row: dict[str, Any]) -> None:
            nonlocal done
            try:
                rec = await self.draw(row)
            except Exception as exc:  # e.g. a worker restarting: not recorded, so a rerun retries it
                print(f"[bank] problem {row['id']}: {exc!r} (not recorded; rerun to retry)", flush=True)
                return
            _append_line(self.path, rec)
            done += 1
            if done % every == 0 or done == len(rows):
                el = time.monotonic() - t0
                print(f"[bank] {done}/{len(rows)} problems, {el:.0f} s elapsed, ETA {el / done * (len(rows) - done):.0f}"
                      f" s, {self.tokens / el:.1f} generated tokens/s sustained", flush=True)

        await asyncio.gather(*(one(r) for r in rows))


def prepare_bank(path: Path, header: dict[str, Any]) -> set[str]:
    """Create the bank (header line) or check an existing one against `header`; the problem ids already in it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _append_line(path, header)
        return set()
    found, problems = read_bank(path, questions=False)
    check_identity(path, found, header)
    return {p["id"] for p in problems}


def add_parser(sub: Any) -> None:
    from .workers import add_worker_args
    from .fit import MAX_TOKENS, TEMPERATURE

    p = sub.add_parser("bank", help="draw the sample bank (N samples per problem, scored by every backend)")
    p.add_argument("--dataset", action="append", required=True, help="JSONL file (path or path:weight); repeatable")
    p.add_argument("--limit", type=int, required=True, help="problems (head of the seeded pool)")
    p.add_argument("--skip", type=int, default=0, help="start after this many problems of the pool")
    p.add_argument("--out", required=True, help="bank file (.jsonl.gz); extended when it exists")
    p.add_argument("--n-bank", type=int, default=N_BANK, help="samples per problem")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    add_worker_args(p)
    p.set_defaults(func=main, concurrency=2)


def main(settings: Any, args: argparse.Namespace) -> int:
    from .calibrate import load_pool
    from .workers import gateway_settings, with_gateway

    for spec in args.dataset:
        path = spec.rsplit(":", 1)[0] if spec.rsplit(":", 1)[-1].isdigit() else spec
        if not Path(path).is_file():
            raise SystemExit(f"dataset {path} not found")
    gws = gateway_settings("prm*arith", args.policy_port, args.reward_port, args.policy_url, args.reward_url)
    from .workers import check_prepared

    check_prepared(gws)
    header = {"format": BANK_FORMAT, "format_version": BANK_VERSION, "models": current_models(gws),
              "n_bank": args.n_bank, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "step_delimiter": "\n", "stored_backends": list(STORED_BACKENDS), "backends": list(BACKENDS),
              "datasets": args.dataset, "seed": args.seed,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    have = prepare_bank(out, header)
    rows = load_pool(args.dataset, args.seed)[args.skip: args.skip + args.limit]
    todo = [r for r in rows if r["id"] not in have]
    print(f"[bank] {len(rows)} problems x {args.n_bank} samples; {len(rows) - len(todo)} already in {out}", flush=True)
    if not todo:
        return 0
    t0 = time.monotonic()

    async def work(gw: Any) -> None:
        runner = BankRunner(gw, out, header, args.concurrency)
        await runner.run(todo)
        el = time.monotonic() - t0
        print(f"[bank] done: {len(todo)} problems in {el:.0f} s (incl. worker start), "
              f"{runner.tokens} tokens generated", flush=True)

    asyncio.run(with_gateway(gws, work))
    return 0
