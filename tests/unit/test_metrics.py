"""Metrics: names/labels/buckets the dashboard relies on, values as events are recorded, multiprocess aggregation
over real subprocesses, and stale .db cleanup across restarts (client_python #367)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import (
    E2E_BUCKETS,
    FLOPS_BUCKETS,
    TTFT_BUCKETS,
    Metrics,
    mark_process_dead,
    prepare_multiproc_dir,
    reap_dead_processes,
    render_latest,
    status_class,
)

REPO = Path(__file__).resolve().parents[2]

DASHBOARD_NAMES = {
    "ttc_requests_total", "ttc_request_duration_seconds", "ttc_time_to_first_token_seconds", "ttc_tokens_total",
    "ttc_flops_total", "ttc_request_flops", "ttc_difficulty_bin_total", "ttc_strategy_chosen_total",
    "ttc_budget_rejections_total", "ttc_budget_exhausted_total", "ttc_cache_requests_total", "ttc_upstream_inflight",
    "ttc_upstream_requests_total", "ttc_upstream_errors_total", "ttc_client_disconnects_total", "ttc_workers_ready",
}  # fmt: skip


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(snap: dict, name: str, **labels: str) -> float | None:
    return snap.get((name, frozenset(labels.items())))


def exposed_names(text: bytes) -> set[str]:
    return {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")}


@pytest.fixture
def m() -> Metrics:
    return Metrics(CollectorRegistry())


def test_status_class():
    assert [status_class(c) for c in (200, 201, 304, 429, 503)] == ["2xx", "2xx", "3xx", "4xx", "5xx"]
    assert status_class(None) == status_class(0) == status_class(999) == "other"


def test_names_and_buckets_are_the_contract(m):
    body, ctype = m.render_latest()
    assert ctype.startswith("text/plain")
    names = exposed_names(body)
    # Counters are exposed as TYPE <base> counter; compare on the family name.
    assert {n.removesuffix("_total") for n in DASHBOARD_NAMES} <= {n.removesuffix("_total") for n in names}
    assert list(E2E_BUCKETS) == [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960,
                                 1920, 7680]  # fmt: skip
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert FLOPS_BUCKETS[0] == 1e9 and FLOPS_BUCKETS[-1] == 1e16 and len(FLOPS_BUCKETS) == 15
    assert all(3.1 < b / a < 3.2 for a, b in zip(FLOPS_BUCKETS, FLOPS_BUCKETS[1:]))
    m.request_done("/v1/chat/completions", "m", 200, "greedy", 0.1)
    m.first_token("/v1/chat/completions", "greedy", 0.1)
    m.request_flops_done("greedy", 1e9, 0)
    snap = samples(m.render_latest()[0])
    les = lambda name: sorted(float(dict(k[1])["le"]) for k in snap if k[0] == name)  # noqa: E731
    assert les("ttc_request_duration_seconds_bucket") == [float(b) for b in E2E_BUCKETS] + [float("inf")]
    assert les("ttc_time_to_first_token_seconds_bucket") == list(TTFT_BUCKETS) + [float("inf")]
    assert les("ttc_request_flops_bucket") == list(FLOPS_BUCKETS) + [float("inf")]


def test_values_change_as_events_are_recorded(m):
    route = "/v1/chat/completions"
    before = samples(m.render_latest()[0])
    assert value(before, "ttc_requests_total", route=route, model="m", status_class="2xx") is None

    m.request_done(route, "m", 200, "best_of_n", 1.2)
    m.request_done(route, "m", 200, "best_of_n", 3.0)
    m.request_done(route, "m", 429, "best_of_n", 0.01)
    m.first_token(route, "best_of_n", 0.03)
    m.add_tokens("m", prompt=10, completion=5, cached_prompt=4)
    m.add_tokens("prm", reward=7)
    m.request_flops_done("best_of_n", policy_flops=2e12, reward_flops=5e11)
    m.add_flops("policy", "beam", 1e10)
    m.difficulty(3)
    m.strategy("best_of_n")
    m.budget_rejection("flops")
    m.budget_exhaustion("beam")
    m.cache_event("response", "hit")
    m.cache_event("samples", "miss")
    m.cache_event("weird", "???")  # unknown vocabulary folds into "other"
    m.upstream_result("policy", "ok")
    m.upstream_error("policy", "timeout")
    m.client_disconnect()
    m.set_workers_ready("policy", 2)
    with m.inflight("policy"):
        with m.inflight("policy"):
            assert value(samples(m.render_latest()[0]), "ttc_upstream_inflight", pool="policy") == 2

    s = samples(m.render_latest()[0])
    assert value(s, "ttc_requests_total", route=route, model="m", status_class="2xx") == 2
    assert value(s, "ttc_requests_total", route=route, model="m", status_class="4xx") == 1
    assert value(s, "ttc_request_duration_seconds_count", route=route, strategy="best_of_n") == 3
    assert value(s, "ttc_request_duration_seconds_bucket", route=route, strategy="best_of_n", le="1.5") == 2
    assert value(s, "ttc_request_duration_seconds_sum", route=route, strategy="best_of_n") == pytest.approx(4.21)
    assert value(s, "ttc_time_to_first_token_seconds_bucket", route=route, strategy="best_of_n", le="0.04") == 1
    assert value(s, "ttc_tokens_total", model="m", type="prompt") == 10
    assert value(s, "ttc_tokens_total", model="m", type="cached_prompt") == 4
    assert value(s, "ttc_tokens_total", model="prm", type="reward") == 7
    assert value(s, "ttc_flops_total", role="policy", strategy="best_of_n") == 2e12
    assert value(s, "ttc_flops_total", role="reward", strategy="best_of_n") == 5e11
    assert value(s, "ttc_flops_total", role="policy", strategy="beam") == 1e10
    assert value(s, "ttc_request_flops_bucket", strategy="best_of_n", le="3.16e+12") == 1
    assert value(s, "ttc_request_flops_bucket", strategy="best_of_n", le="1e+12") == 0
    assert value(s, "ttc_difficulty_bin_total", bin="3") == 1
    assert value(s, "ttc_strategy_chosen_total", strategy="best_of_n") == 1
    assert value(s, "ttc_budget_rejections_total", reason="flops") == 1
    assert value(s, "ttc_budget_exhausted_total", strategy="beam") == 1
    assert value(s, "ttc_cache_requests_total", kind="response", result="hit") == 1
    assert value(s, "ttc_cache_requests_total", kind="samples", result="miss") == 1
    assert value(s, "ttc_cache_requests_total", kind="other", result="other") == 1
    assert value(s, "ttc_upstream_requests_total", pool="policy", outcome="ok") == 1
    assert value(s, "ttc_upstream_errors_total", pool="policy", kind="timeout") == 1
    assert value(s, "ttc_client_disconnects_total") == 1
    assert value(s, "ttc_workers_ready", pool="policy") == 2
    assert value(s, "ttc_upstream_inflight", pool="policy") == 0


def test_free_form_labels_are_capped():
    m = Metrics(CollectorRegistry(), max_label_values=2)
    for model in ("a", "b", "c", "d", "a"):
        m.request_done("/v1/completions", model, 200, "greedy", 0.5)
    s = samples(m.render_latest()[0])
    models = {dict(k[1])["model"] for k in s if k[0] == "ttc_requests_total"}
    assert models == {"a", "b", "other"}
    assert value(s, "ttc_requests_total", route="/v1/completions", model="other", status_class="2xx") == 2


def test_fresh_registries_do_not_collide():
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())
    Metrics()  # default: a private registry, not the global one


# -- multiprocess mode: real processes writing .db files --

WORKER = """
import sys
from service.metrics import Metrics
m = Metrics()
for _ in range(5):
    m.request_done("/v1/chat/completions", "m", 200, "greedy", 0.5)
m.upstream_inflight.labels("policy").inc(2)
m.set_workers_ready("policy", int(sys.argv[1]))
print("ready", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.read()
"""


def spawn(tmp: Path, ready: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(ready), mode],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err


def test_multiprocess_counters_sum_and_live_gauges(tmp_path):
    procs = [spawn(tmp_path, ready, "wait") for ready in (1, 3, 2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        body, _ = render_latest(multiproc_path=str(tmp_path))
        s = samples(body)
        assert value(s, "ttc_requests_total", route="/v1/chat/completions", model="m", status_class="2xx") == 15
        assert value(s, "ttc_request_duration_seconds_count", route="/v1/chat/completions", strategy="greedy") == 15
        assert value(s, "ttc_upstream_inflight", pool="policy") == 6  # livesum
        assert value(s, "ttc_workers_ready", pool="policy") == 3  # livemax
        assert not any("pid" in dict(k[1]) for k in s)  # no per-process series
    finally:
        finish(procs)  # communicate() closes stdin: the workers exit
    # Workers gone: their counts stay, their live gauges go (reaped at render time even without a hook).
    s = samples(render_latest(multiproc_path=str(tmp_path))[0])
    assert value(s, "ttc_requests_total", route="/v1/chat/completions", model="m", status_class="2xx") == 15
    assert not value(s, "ttc_upstream_inflight", pool="policy")
    assert not value(s, "ttc_workers_ready", pool="policy")


def run_workers(tmp: Path, n: int) -> list[int]:
    procs = [spawn(tmp, 1, "exit") for _ in range(n)]
    finish(procs)
    return [p.pid for p in procs]


def db_files(tmp: Path) -> list[str]:
    return sorted(f.name for f in tmp.glob("*.db"))


def test_mark_process_dead_and_reap_remove_only_live_gauges(tmp_path):
    a, b = run_workers(tmp_path, 2)
    assert {f"gauge_livesum_{a}.db", f"gauge_livemax_{a}.db", f"counter_{a}.db"} <= set(db_files(tmp_path))
    mark_process_dead(a, tmp_path)  # explicit hook (gunicorn child_exit / worker shutdown)
    assert not any(f.startswith("gauge_live") and f.endswith(f"_{a}.db") for f in db_files(tmp_path))
    assert f"counter_{a}.db" in db_files(tmp_path)  # counts of a dead worker are kept
    assert reap_dead_processes(tmp_path) == [b]  # SIGKILLed worker: no hook ran, found by pid
    assert reap_dead_processes(tmp_path) == []
    assert reap_dead_processes(tmp_path, pids=[os.getpid()]) == []  # a live pid is never reaped


def test_stale_db_files_do_not_grow_across_restarts(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    counts, removed = [], []
    for _restart in range(3):
        removed.append(prepare_multiproc_dir(tmp_path))  # master start-up
        run_workers(tmp_path, 2)
        counts.append(len(db_files(tmp_path)))
    assert counts[0] > 0 and counts == [counts[0]] * 3
    assert removed == [0, counts[0], counts[0]]
    assert (tmp_path / "keep.txt").exists()
    # Control: a restart without the wipe does grow the directory, so the assertion above can fail.
    run_workers(tmp_path, 2)
    assert len(db_files(tmp_path)) == 2 * counts[0]
    # A fresh start also resets what is exported.
    prepare_multiproc_dir(tmp_path)
    assert not value(samples(render_latest(multiproc_path=str(tmp_path))[0]), "ttc_requests_total",
                     route="/v1/chat/completions", model="m", status_class="2xx")  # fmt: skip


def test_prepare_creates_missing_dir(tmp_path):
    target = tmp_path / "a" / "b"
    assert prepare_multiproc_dir(target) == 0 and target.is_dir()
