"""PRM head: save/load, token layout, score range and monotonicity, and the client's step-score cache (fake pool)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from service.cache.memory import MemoryCache
from service.metering import Meter, ModelShape
from service.models.prm_head import PRMHead, PRMTokenizer, format_for_prm, step_features
from service.workers.reward import MeteredPRM, PRMClient

D = 576


def _head(dim: int = 3 * D, mlp: bool = False, seed: int = 0) -> PRMHead:
    rng = np.random.default_rng(seed)
    kw = {}
    if mlp:
        kw = {"hidden_w": rng.normal(size=(dim, 8)).astype(np.float32) * 0.05,
              "hidden_b": rng.normal(size=8).astype(np.float32)}
    return PRMHead(mean=rng.normal(size=dim).astype(np.float32), std=rng.uniform(0.5, 2, dim).astype(np.float32),
                   weights=rng.normal(size=8 if mlp else dim).astype(np.float32) * 0.05, bias=0.3,
                   metadata={"model": "smollm2-135m-instruct", "step_delimiter": "\n"}, **kw)


class CharTokenizer:
    """One token per character: enough for layouts and the client's cache, without a downloaded model (the real
    tokenizer's layout is checked in tests/integration/test_prm_tokenizer.py)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return [ord(c) for c in text + ("<|im_start|>assistant\n" if add_generation_prompt else "")]

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.fixture(scope="module")
def tok() -> PRMTokenizer:
    return PRMTokenizer(CharTokenizer())


@pytest.mark.parametrize("mlp", [False, True])
def test_save_load_round_trip(tmp_path, mlp):
    head = _head(mlp=mlp)
    path = tmp_path / "h.npz"
    head.save(path)
    back = PRMHead.load(path)
    x = np.random.default_rng(1).normal(size=(5, head.dim)).astype(np.float32)
    np.testing.assert_allclose(back.score(x), head.score(x), rtol=1e-6)
    assert back.version == head.version
    assert back.metadata["model"] == "smollm2-135m-instruct" and back.delimiter == "\n"
    assert path.stat().st_size < 200_000


def test_scores_in_unit_interval_and_monotone_in_logit():
    head = _head()
    x = np.random.default_rng(2).normal(size=(200, head.dim)).astype(np.float32) * 10
    s, z = head.score(x), head.logits(x)
    assert ((s >= 0) & (s <= 1)).all()
    order = np.argsort(z)
    assert (np.diff(s[order]) >= 0).all()
    assert head.score(np.zeros((0, head.dim))).shape == (0,)


def test_step_features(tok):
    lay = format_for_prm("Q?", ["1 + 1 = 2", "The answer is 2."], tok)
    h = np.random.default_rng(3).normal(size=(len(lay.token_ids), D)).astype(np.float32)
    f = step_features(h, lay)
    assert f.shape == (2, 3 * D)
    (s0, e0), (s1, e1) = lay.step_spans
    np.testing.assert_allclose(f[1, :D], h[e1 - 1])
    np.testing.assert_allclose(f[1, D:2 * D], h[s1:e1].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f[1, 2 * D:], h[lay.prompt_len:e1].mean(0), rtol=1e-5, atol=1e-5)


def test_bare_prompt_is_the_question_and_one_delimiter():
    """The short layout: no chat template, no system prompt; the steps follow exactly as in the chat layout."""
    chat, bare = PRMTokenizer(CharTokenizer()), PRMTokenizer(CharTokenizer(), prompt="bare")
    steps = ["1 + 1 = 2", "The answer is 2."]
    lb, lc = bare.layout("  Q?  ", steps), chat.layout("Q?", steps)
    assert lb.token_ids[:lb.prompt_len] == [ord(c) for c in "Q?\n"]
    assert lb.token_ids[lb.prompt_len:] == lc.token_ids[lc.prompt_len:]
    assert [e - s for s, e in lb.step_spans] == [e - s for s, e in lc.step_spans]
    assert len(lc.token_ids) - len(lb.token_ids) > len(chat.system)  # the system prompt is gone
    with pytest.raises(ValueError, match="prompt"):
        PRMTokenizer(CharTokenizer(), prompt="few-shot")


def test_tokenizer_for_head_follows_its_metadata():
    head = _head()
    head.metadata.update(prompt="bare", layers=10, system="S")
    tok = PRMTokenizer.for_head(CharTokenizer(), head)
    assert (tok.prompt, tok.system, tok.delimiter, head.layers) == ("bare", "S", "\n", 10)
    old = _head()  # a head from before the short layout: the chat template, all layers
    assert (PRMTokenizer.for_head(CharTokenizer(), old).prompt, old.layers) == ("chat", None)


class FakePool:
    """Deterministic hidden states per token id, in the /pooling response format (base64 float32)."""

    name, served_name = "reward", "prm"

    def __init__(self):
        self.calls = []

    async def post_json(self, path, payload):
        self.calls.append(payload)
        data = []
        for i, ids in enumerate(payload["input"]):
            h = np.stack([np.random.default_rng(t).normal(size=D) for t in ids]).astype(np.float32)
            data.append({"index": i, "data": base64.b64encode(h.tobytes()).decode()})
        return {"data": data, "usage": {"prompt_tokens": sum(len(x) for x in payload["input"])}}


def test_client_caches_step_scores(tok):
    shape = ModelShape.from_config({"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152})
    pool = FakePool()
    client = PRMClient(pool, shape, _head(), tok, cache=MemoryCache())
    cands = [["3 + 5 = 8", "The answer is 8."], ["3 + 5 = 9", "The answer is 9."], ["3 + 5 = 8", "The answer is 8."]]
    m1, m2 = Meter(), Meter()
    first = asyncio.run(MeteredPRM(client, m1).score("What is 3 + 5?", cands))
    assert [len(s) for s in first] == [2, 2, 2] and first[0] == first[2]
    assert len(pool.calls) == 1 and len(pool.calls[0]["input"]) == 2  # duplicates sent once
    assert m1.reward.flops > 0
    second = asyncio.run(MeteredPRM(client, m2).score("What is 3 + 5?", cands))
    assert second == first and len(pool.calls) == 1 and m2.reward.flops == 0
    assert asyncio.run(client.score("What is 3 + 5?", [[]])) == [[]]


def test_sample_costs_meter_each_sample_layout_against_its_generation():
    from service.offline.prm_report import sample_costs

    cfg = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
           "vocab_size": 49152}
    policy, reward = (ModelShape.from_config(dict(cfg, num_hidden_layers=n)) for n in (30, 10))
    tok = PRMTokenizer(CharTokenizer(), prompt="bare")
    rows = [{"question": "Q?", "samples": ["1 + 1 = 2\nThe answer is 2.", "The answer is 3."]}]
    c = sample_costs(rows, tok.layout, lambda r: 50, lambda t: len(t), policy, reward)
    lens = [len("Q?\n1 + 1 = 2\nThe answer is 2.\n"), len("Q?\nThe answer is 3.\n")]
    assert c["reward_tokens"] == np.mean(lens) and c["reward_layers"] == 10
    assert c["reward_flops"] == pytest.approx(np.mean([reward.encode_flops(n) for n in lens]))
    gens = [policy.generation_flops(50, 50, [len(t)]) for t in rows[0]["samples"]]
    assert c["policy_flops"] == pytest.approx(np.mean(gens))
    assert c["reward_over_policy"] == pytest.approx(c["reward_flops"] / c["policy_flops"])
