"""The overhead benchmark's statistics (bootstrap over gateway/direct pairs) and its lane driver, against two local
stand-ins for vLLM: one answering at once, one a known 20 ms later."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import fake_vllm, loadtest


def test_pair_difference_is_exact_when_every_pair_differs_by_the_same_amount():
    # Direct latencies spread over 1-100 ms, the gateway always 1.5 ms slower: resampling whole pairs keeps the
    # difference at exactly 1.5 ms, while each side's own quantiles still vary between resamples.
    rng = np.random.default_rng(7)
    direct = rng.uniform(0.001, 0.100, 300)
    summary = loadtest.pair_summary(direct + 0.0015, direct, n_boot=500)
    assert summary["pairs"] == 300
    for q in ("p50_ms", "p99_ms"):
        d = summary["difference"][q]
        assert d["value"] == pytest.approx(1.5) and d["lo"] == pytest.approx(1.5) and d["hi"] == pytest.approx(1.5)
    side = summary["gateway"]["p50_ms"]
    assert side["hi"] - side["lo"] > 5  # a side's median over 1-100 ms is uncertain by several ms
    assert summary["side_gap"]["p50_ms"]["value"] == pytest.approx(1.5, abs=1e-9)


def test_intervals_cover_the_true_quantiles_and_shrink_with_more_pairs():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 1600):
        direct = rng.normal(0.050, 0.005, n)
        gateway = direct + rng.normal(0.002, 0.0005, n)  # true per-pair median difference: 2 ms
        d = loadtest.pair_summary(gateway, direct, n_boot=1000, seed=1)["difference"]["p50_ms"]
        assert d["lo"] < 2.0 < d["hi"]
        assert d["lo"] <= d["value"] <= d["hi"]
        widths.append(d["hi"] - d["lo"])
    assert widths[1] < widths[0] / 2  # 16x the pairs: about a quarter of the width


def test_p99_is_the_tail_not_the_middle():
    direct = np.full(200, 0.010)
    gateway = direct.copy()
    gateway[:4] += 0.050  # 2% of pairs 50 ms slower
    summary = loadtest.pair_summary(gateway, direct, n_boot=500)
    assert summary["difference"]["p50_ms"]["value"] == pytest.approx(0.0)
    assert summary["difference"]["p99_ms"]["value"] == pytest.approx(50.0)
    assert summary["gateway"]["p99_ms"]["value"] == pytest.approx(60.0)


def test_pair_summary_refuses_unpaired_input():
    with pytest.raises(ValueError):
        loadtest.pair_summary([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError):
        loadtest.pair_summary([0.1], [0.1])


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_lanes_measure_a_known_added_delay(concurrency):
    fast = await fake_vllm.start("127.0.0.1", 0, "m")
    slow = await fake_vllm.start("127.0.0.1", 0, "m", delay_s=0.020)
    url = lambda server: f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # noqa: E731
    try:
        gw, direct, first = await loadtest.overhead_lanes(url(slow), url(fast), "m", pairs=10,
                                                          concurrency=concurrency, warmup=1, think_s=0.002)
    finally:
        for server in (fast, slow):
            server.close()
            await server.wait_closed()
    n = -(-10 // concurrency) * concurrency  # whole lanes: at least the pairs asked for
    assert len(gw) == len(direct) == len(first) == n
    assert sum(first) == n // 2  # each lane swaps which side goes first, pair after pair
    diff = loadtest.pair_summary(gw, direct, n_boot=200)["difference"]["p50_ms"]["value"]
    assert 19.0 < diff < 60.0
    assert loadtest.format_overhead({"concurrency": concurrency, "wall_s": 1.0, "loadavg_before": (1.0, 1.0, 1.0),
                                     "loadavg_after": (1.0, 1.0, 1.0), **loadtest.pair_summary(gw, direct)})
