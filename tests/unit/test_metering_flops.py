"""The FLOPs meter against torch's FlopCounterMode, on forward passes of a model built from the bundled model's
config (SmolLM2-135M's shape, random weights, fewer layers: FLOPs do not depend on the weights, and the meter's
per-layer terms are pinned by any depth). No downloaded model needed."""

import pytest

from service.metering import ModelShape

torch = pytest.importorskip("torch", reason="torch not installed (comes with the cpu/gpu extras)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (comes with the engine extras)")


def counted_generation_flops(model, prompt_len: int, new_tokens: int) -> float:
    """FLOPs FlopCounterMode sees for one prefill plus (new_tokens - 1) cached decode steps, logits only where sampled."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(10, 1000, (1, prompt_len))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
    return float(counter.get_total_flops())


# SmolLM2-135M-Instruct's config.json (the fields that shape the compute).
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 576,
           "head_dim": 64, "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
LAYERS = 4


@pytest.fixture(scope="module")
def shape() -> ModelShape:
    return ModelShape.from_config(dict(SMOLLM2, num_hidden_layers=LAYERS))


@pytest.fixture(scope="module")
def bundled_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in SMOLLM2.items() if k not in ("architectures", "model_type")})
    config.num_hidden_layers = LAYERS
    # Eager attention: the CPU SDPA kernel is invisible to FlopCounterMode, explicit matmuls are counted.
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.mark.parametrize("prompt_len,new_tokens", [(64, 16), (150, 48)])
def test_meter_matches_flop_counter(bundled_model, shape, prompt_len, new_tokens):
    metered = shape.generation_flops(prompt_len, 0, [new_tokens])
    counted = counted_generation_flops(bundled_model, prompt_len, new_tokens)
    assert abs(metered - counted) / counted < 0.05, (metered, counted)


@pytest.mark.parametrize("prompt_len,new_tokens", [(32, 8), (400, 4)])
def test_meter_differs_only_by_masked_prefill_half(bundled_model, shape, prompt_len, new_tokens):
    """Eager prefill multiplies the whole s x s score matrix, masked half included; a causal kernel skips it.

    Adding that half back must reproduce the counter exactly, which pins every other term of the meter.
    """
    masked_half = 2.0 * shape.n_layer * shape.d_attn * prompt_len * (prompt_len - 1)
    metered = shape.generation_flops(prompt_len, 0, [new_tokens]) + masked_half
    counted = counted_generation_flops(bundled_model, prompt_len, new_tokens)
    assert abs(metered - counted) / counted < 0.002, (metered, counted)


def test_shape_from_config_counts_smollm2():
    shape = ModelShape.from_config(SMOLLM2)
    # SmolLM2-135M: 134.5M parameters of which 28.3M are the (tied) embedding.
    assert 100e6 < shape.non_embedding_params < 110e6
    assert shape.logits_flops(1) == 2 * 576 * 49152
