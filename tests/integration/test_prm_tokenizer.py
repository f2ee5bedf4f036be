"""The PRM layout against the bundled model's real tokenizer (needs the prepared model folder, no workers)."""

from __future__ import annotations

import pytest

from service.models.prm_head import PRMTokenizer, format_for_prm


@pytest.fixture(scope="module")
def tok(prepared_policy_dir) -> PRMTokenizer:
    return PRMTokenizer.from_model_dir(prepared_policy_dir)


def test_layout_step_ends_match_tokenizer(tok):
    steps = ["12 + 7 = 19", "19 * 2 = 38\n", "The answer is 38."]
    lay = format_for_prm("What is (12 + 7) * 2?", steps, tok)
    nl = tok.tokenizer.encode("\n", add_special_tokens=False)
    assert len(nl) == 1, "the step delimiter must be one token"
    assert len(lay.step_spans) == 3
    for (start, end), step in zip(lay.step_spans, steps):
        assert lay.token_ids[end - 1] == nl[0]
        assert tok.tokenizer.decode(lay.token_ids[start:end]) == step.rstrip("\n") + "\n"
    # Segment-by-segment ids equal the tokenizer's ids of the joined text for this (ordinary) solution.
    joined = "".join(s.rstrip("\n") + "\n" for s in steps)
    assert lay.token_ids[lay.prompt_len:] == tok.tokenizer.encode(joined, add_special_tokens=False)
    # With or without the trailing delimiter, a step lays out the same.
    assert format_for_prm("What is (12 + 7) * 2?", [s.rstrip("\n") for s in steps], tok).token_ids == lay.token_ids
