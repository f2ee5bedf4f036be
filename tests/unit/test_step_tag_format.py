"""Step-tag PRM formats (Qwen2.5-Math-PRM, Math-Shepherd): what the worker is asked to tokenise, and the vLLM
arguments a worker of each family is started with. The real-worker checks are in
tests/integration/test_step_tag_prm.py."""

from __future__ import annotations

import json

import pytest

from service.workers.step_prm import StepTagFormat, _softmax_column
from service.workers.supervisor import WorkerSpec, step_pooling_args

STEPS = ["3 + 5 = 8", "8 * 2 = 16", "The answer is 16."]


def test_qwen_prm_renders_the_conversation_with_a_tag_after_every_step():
    fmt = StepTagFormat.named("qwen-prm")
    assert (fmt.step_tag, fmt.step_tag_id, fmt.good_index) == ("<extra_0>", 151651, 1)
    body = fmt.tokenize_body("prm", "What is (3 + 5) * 2?", STEPS)
    system, user, assistant = body["messages"]
    assert system["role"] == "system" and "\\boxed{}" in system["content"]
    assert user == {"role": "user", "content": "What is (3 + 5) * 2?"}
    assert assistant["content"] == "3 + 5 = 8<extra_0>8 * 2 = 16<extra_0>The answer is 16.<extra_0>"
    assert body["add_generation_prompt"] is False


def test_math_shepherd_renders_its_training_format():
    fmt = StepTagFormat.named("math-shepherd")
    assert (fmt.step_tag, fmt.step_tag_id, fmt.good_index) == (" ки", 12902, 0)
    body = fmt.tokenize_body("prm", "What is (3 + 5) * 2?", ["3 + 5 = 8\n", "8 * 2 = 16"])
    assert body["prompt"] == "What is (3 + 5) * 2? 3 + 5 = 8 ки\n8 * 2 = 16 ки"


def test_a_tag_written_by_the_policy_cannot_fake_a_step():
    fmt = StepTagFormat.named("qwen-prm")
    body = fmt.tokenize_body("prm", "Q<extra_0>?", ["8 <extra_0> 9", "ok"])
    assert body["messages"][2]["content"].count("<extra_0>") == 2
    assert "<extra_0>" not in body["messages"][1]["content"]


def test_overrides_and_unknown_format():
    fmt = StepTagFormat.named("math-shepherd", step_tag="<jupyter_code>", step_tag_id=13, good_index=1)
    assert (fmt.step_tag, fmt.step_tag_id, fmt.good_index) == ("<jupyter_code>", 13, 1)
    with pytest.raises(ValueError, match="unknown"):
        StepTagFormat.named("orm")


def test_good_column_is_a_softmax_over_the_row():
    assert _softmax_column([0.0, 0.0], 0) == pytest.approx(0.5)
    assert _softmax_column([2.0, 0.0], 0) == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-2.0)))
    assert _softmax_column([1000.0, -1000.0], 1) == pytest.approx(0.0)  # no overflow


def test_worker_arguments_per_family():
    shepherd = step_pooling_args("math-shepherd", 12902)
    assert shepherd[shepherd.index("--convert") + 1] == "classify"
    overrides = json.loads(shepherd[shepherd.index("--hf-overrides") + 1])
    assert overrides == {"classifier_from_token": ["+", "-"], "method": "no_post_processing"}
    assert json.loads(shepherd[shepherd.index("--pooler-config") + 1]) == {"task": "token_classify",
                                                                          "tok_pooling_type": "STEP",
                                                                          "step_tag_id": 12902}
    qwen = step_pooling_args("qwen-prm", 151651)
    assert "--convert" not in qwen and json.loads(qwen[-1])["step_tag_id"] == 151651
    spec = WorkerSpec(role="reward", model_dir="/m", served_name="prm", port=1, pooling=True, pooling_args=qwen)
    cmd = spec.command()
    assert cmd[cmd.index("--runner") + 1] == "pooling" and "token_embed" not in " ".join(cmd)
    default = WorkerSpec(role="reward", model_dir="/m", served_name="prm", port=1, pooling=True).command()
    assert "token_embed" in " ".join(default)
