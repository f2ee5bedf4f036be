"""Prometheus metrics of the gateway (names are a contract with the Grafana dashboard).

Naming follows Prometheus conventions (base units, `_total` counters); latency buckets are vLLM's, so gateway and
worker histograms line up. Labels are bounded: never user, API key or request id, and free-form label values are
capped per label (overflow becomes "other") so a client cannot blow up cardinality with made-up model names.

Multiprocess (several uvicorn/gunicorn workers): set PROMETHEUS_MULTIPROC_DIR *before* prometheus_client is imported,
call `prepare_multiproc_dir()` once in the master before workers start, `mark_process_dead(pid)` when a worker exits
(gunicorn `child_exit`, or a worker's own shutdown), and serve `render_latest()`. Counter/histogram files of dead
workers are kept until the next master start (their counts must not vanish mid-run); that bounds the .db growth of
client_python #367 to one run instead of forever.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)

log = logging.getLogger("ttc.metrics")

# vLLM vllm:e2e_request_latency_seconds and vllm:time_to_first_token_seconds buckets.
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
# Half-decade steps 1e9 .. 1e16 (factor 10**0.5 ~ 3.16), rounded so `le` labels stay readable.
FLOPS_BUCKETS = tuple(float(f"{10 ** (9 + i / 2):.3g}") for i in range(15))

TOKEN_TYPES = frozenset({"prompt", "completion", "cached_prompt", "reward"})
FLOPS_ROLES = frozenset({"policy", "reward"})
CACHE_KINDS = frozenset({"response", "prm", "samples"})
CACHE_RESULTS = frozenset({"hit", "miss", "bypass", "error"})
OTHER = "other"
_ENV_VARS = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_PID_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def status_class(code: int | None) -> str:
    """HTTP status code -> "2xx" .. "5xx"; anything else (None, 0 = client went away before a status) -> "other"."""
    if code is None or not 100 <= int(code) <= 599:
        return OTHER
    return f"{int(code) // 100}xx"


def multiproc_dir() -> str | None:
    for var in _ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


class _LabelGuard:
    """Caps distinct values of one free-form label; fixed vocabularies are checked exactly."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: object, allowed: frozenset[str] | None = None) -> str:
        v = str(value) if value is not None and value != "" else "none"
        if allowed is not None:
            return v if v in allowed else OTHER
        seen = self._seen.setdefault(label, set())
        if v in seen:
            return v
        if len(seen) >= self.limit:
            return OTHER
        seen.add(v)
        return v


class Metrics:
    """All gateway metrics on one registry. Record through the methods; they enforce the label vocabularies."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_label_values: int = 64,
                 process_metrics: bool = True) -> None:
        mp = multiproc_dir()
        if mp and not _mmap_values():
            log.warning("PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported: values stay per-process")
        # A private registry by default: two Metrics() in one process (tests, reloads) must not collide on REGISTRY.
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics and registry is None and not mp:
            # Per-process collectors make no sense summed over workers, so only in single-process mode.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._label = _LabelGuard(max_label_values)
        # Labelled children by (metric, values): `labels()` takes a lock and re-validates the values on every call,
        # several times per request. Bounded like the label values themselves (the guard caps them).
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        r = self.registry

        self.requests = Counter("ttc_requests_total", "Requests answered, by route, model and status class.",
                                ["route", "model", "status_class"], registry=r)
        self.request_duration = Histogram("ttc_request_duration_seconds", "End-to-end request latency.",
                                          ["route", "strategy"], buckets=E2E_BUCKETS, registry=r)
        self.ttft = Histogram("ttc_time_to_first_token_seconds", "Time to the first streamed token.",
                              ["route", "strategy"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("ttc_tokens_total", "Tokens by type (prompt|completion|cached_prompt|reward).",
                              ["model", "type"], registry=r)
        self.flops = Counter("ttc_flops_total", "Estimated FLOPs spent, by role (policy|reward) and strategy.",
                             ["role", "strategy"], registry=r)
        self.request_flops = Histogram("ttc_request_flops", "Estimated FLOPs per request (policy + reward).",
                                       ["strategy"], buckets=FLOPS_BUCKETS, registry=r)
        self.difficulty_bin = Counter("ttc_difficulty_bin_total", "Requests per predicted difficulty bin.",
                                      ["bin"], registry=r)
        self.strategy_chosen = Counter("ttc_strategy_chosen_total", "Strategy picked per request.",
                                       ["strategy"], registry=r)
        self.budget_rejections = Counter("ttc_budget_rejections_total", "Requests refused by budget checks.",
                                         ["reason"], registry=r)
        self.budget_exhausted = Counter("ttc_budget_exhausted_total", "Requests cut short by their budget.",
                                        ["strategy"], registry=r)
        self.cache_requests = Counter("ttc_cache_requests_total", "Cache lookups by kind and result.",
                                      ["kind", "result"], registry=r)
        # livesum: total in-flight across live workers; a dead worker's in-flight requests are gone with it.
        self.upstream_inflight = Gauge("ttc_upstream_inflight", "Requests in flight to a worker pool.",
                                       ["pool"], multiprocess_mode="livesum", registry=r)
        self.upstream_requests = Counter("ttc_upstream_requests_total", "Upstream calls by pool and outcome.",
                                         ["pool", "outcome"], registry=r)
        self.upstream_errors = Counter("ttc_upstream_errors_total", "Upstream errors by pool and kind.",
                                       ["pool", "kind"], registry=r)
        self.client_disconnects = Counter("ttc_client_disconnects_total", "Clients that went away mid-request.",
                                          registry=r)
        # livemax: every worker observes the same pool, so the freshest optimistic view is the max over live
        # workers; it is right whether one or all workers run health checks, and adds no pid label (liveall would).
        self.workers_ready = Gauge("ttc_workers_ready", "Ready upstream workers per pool.",
                                   ["pool"], multiprocess_mode="livemax", registry=r)

    # -- recording helpers --

    def _child(self, metric: Counter | Gauge | Histogram, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request_done(self, route: str, model: str, status_code: int | None, strategy: str, duration_s: float) -> None:
        route, strategy = self._label("route", route), self._label("strategy", strategy)
        self._child(self.requests, route, self._label("model", model), status_class(status_code)).inc()
        self._child(self.request_duration, route, strategy).observe(max(0.0, duration_s))

    def first_token(self, route: str, strategy: str, seconds: float) -> None:
        self._child(self.ttft, self._label("route", route), self._label("strategy", strategy)).observe(max(0.0, seconds))

    def add_tokens(self, model: str, *, prompt: int = 0, completion: int = 0, cached_prompt: int = 0,
                   reward: int = 0) -> None:
        model = self._label("model", model)
        for kind, n in (("prompt", prompt), ("completion", completion), ("cached_prompt", cached_prompt),
                        ("reward", reward)):
            if n > 0:
                self._child(self.tokens, model, kind).inc(n)

    def add_flops(self, role: str, strategy: str, flops: float) -> None:
        """Partial spend (e.g. while streaming); call `request_flops_done` once per request for the histogram."""
        if flops > 0:
            self._child(self.flops, self._label("role", role, FLOPS_ROLES), self._label("strategy", strategy)).inc(flops)

    def request_flops_done(self, strategy: str, policy_flops: float, reward_flops: float,
                           *, counted: bool = False) -> None:
        """One request's FLOPs: adds to the counters (unless already `counted` via add_flops) and the histogram."""
        if not counted:
            self.add_flops("policy", strategy, policy_flops)
            self.add_flops("reward", strategy, reward_flops)
        self._child(self.request_flops, self._label("strategy", strategy)).observe(
            max(0.0, policy_flops + reward_flops))

    def difficulty(self, bin_: str | int) -> None:
        self.difficulty_bin.labels(self._label("bin", bin_)).inc()

    def strategy(self, strategy: str) -> None:
        self._child(self.strategy_chosen, self._label("strategy", strategy)).inc()

    def budget_rejection(self, reason: str) -> None:
        self.budget_rejections.labels(self._label("reason", reason)).inc()

    def budget_exhaustion(self, strategy: str) -> None:
        self.budget_exhausted.labels(self._label("strategy", strategy)).inc()

    def cache_event(self, kind: str, result: str) -> None:
        """Matches the cache's `on_event(kind, result)` hook: pass `metrics.cache_event` to build_cache."""
        kind, result = self._label("kind", kind, CACHE_KINDS), self._label("result", result, CACHE_RESULTS)
        self._child(self.cache_requests, kind, result).inc()

    @contextlib.contextmanager
    def inflight(self, pool: str) -> Iterator[None]:
        g = self.inflight_gauge(pool)
        g.inc()
        try:
            yield
        finally:
            g.dec()

    def inflight_gauge(self, pool: str) -> Gauge:
        return self._child(self.upstream_inflight, self._label("pool", pool))

    def upstream_result(self, pool: str, outcome: str) -> None:
        self._child(self.upstream_requests, self._label("pool", pool), self._label("outcome", outcome)).inc()

    def upstream_error(self, pool: str, kind: str) -> None:
        self.upstream_errors.labels(self._label("pool", pool), self._label("error_kind", kind)).inc()

    def client_disconnect(self) -> None:
        self.client_disconnects.inc()

    def set_workers_ready(self, pool: str, ready: int) -> None:
        self.workers_ready.labels(self._label("pool", pool)).set(ready)

    def render_latest(self) -> tuple[bytes, str]:
        return render_latest(self.registry)


def _mmap_values() -> bool:
    # prometheus_client picks its value class at import time from the environment.
    return values.ValueClass.__name__ != "MutexValue"


def render_latest(registry: CollectorRegistry | None = None, multiproc_path: str | None = None) -> tuple[bytes, str]:
    """Exposition text and content type. Multiprocess: aggregate the .db files on a fresh registry (per the
    prometheus_client docs, never the registry the metrics live on, or series are exported twice)."""
    path = multiproc_path or multiproc_dir()
    if path:
        reap_dead_processes(path)
        fresh = CollectorRegistry()
        multiprocess.MultiProcessCollector(fresh, path=path)
        return generate_latest(fresh), CONTENT_TYPE_LATEST
    return generate_latest(registry if registry is not None else REGISTRY), CONTENT_TYPE_LATEST


def prepare_multiproc_dir(path: str | os.PathLike | None = None) -> int:
    """Master start-up: create the dir and delete every *.db left by a previous run; returns how many.

    Must run before any worker (or this process) writes a metric: files still mapped by a live process would be lost.
    Only *.db files are removed, so a mis-set directory does not lose unrelated data.
    """
    p = Path(path or multiproc_dir() or "")
    if not str(p):
        return 0
    p.mkdir(parents=True, exist_ok=True)
    removed = 0
    for f in p.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            removed += 1
    return removed


def mark_process_dead(pid: int, path: str | os.PathLike | None = None) -> None:
    """Worker exit: drop its live-gauge files (gunicorn `child_exit` hook, or the worker's own shutdown)."""
    path = str(path or multiproc_dir() or "")
    if path:
        multiprocess.mark_process_dead(pid, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str | os.PathLike | None = None, pids: Iterable[int] | None = None) -> list[int]:
    """Mark dead every pid that owns live-gauge files but no longer exists (a SIGKILLed worker never ran its
    shutdown hook, and its in-flight gauge would otherwise be summed forever). Returns the reaped pids."""
    path = str(path or multiproc_dir() or "")
    if not path:
        return []
    found = {int(m.group(1)) for f in glob.glob(os.path.join(path, "gauge_live*_*.db"))
             if (m := _PID_FILE.match(os.path.basename(f)))}
    dead = sorted(pid for pid in (found if pids is None else set(pids) & found) if not _pid_alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return dead
