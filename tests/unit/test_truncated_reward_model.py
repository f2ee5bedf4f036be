"""The reward worker's truncated model: prepare_models.truncate_layers writes a folder whose config and safetensors
hold the first k decoder layers (and nothing else of the later ones), the folder computes exactly what the full
model's first k layers compute (then the final norm), the FLOPs meter reads its depth from its own config.json, and
the gateway serves the depth the PRM head was trained on and refuses any other. A small random Llama built from
SmolLM2's shape (fewer layers, smaller vocabulary) stands in for the bundled model: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings, truncated_model_name
from service.metering import ModelShape
from service.models.prm_head import PRMHead
from service.offline import prepare_models
from service.offline.prepare_models import MARKER, prepare_reward, truncate_layers

torch = pytest.importorskip("torch", reason="torch not installed (comes with the cpu/gpu extras)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (comes with the engine extras)")
safetensors = pytest.importorskip("safetensors")

LAYERS, KEEP = 4, 2
# SmolLM2-135M's per-layer shape; the vocabulary is cut so the folder stays small (it does not change the layers).
CONFIG = {"hidden_size": 576, "head_dim": 64, "intermediate_size": 1536, "num_attention_heads": 9,
          "num_key_value_heads": 3, "num_hidden_layers": LAYERS, "vocab_size": 512, "tie_word_embeddings": True,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.float32).eval()
    out = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text('{"stand-in": true}')
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / MARKER).write_text("{}")
    return out


@pytest.fixture(scope="module")
def cut_dir(full_dir) -> Path:
    dst = full_dir.parent / truncated_model_name("tiny", KEEP)
    truncate_layers(full_dir, dst, KEEP)
    return dst


def _keys(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_config_and_weights_hold_the_first_layers_only(full_dir, cut_dir):
    full_cfg, cut_cfg = (json.loads((d / "config.json").read_text()) for d in (full_dir, cut_dir))
    assert cut_cfg["num_hidden_layers"] == KEEP
    assert {k: v for k, v in cut_cfg.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in full_cfg.items() if k != "num_hidden_layers"}
    full, cut = _keys(full_dir), _keys(cut_dir)
    layer_of = {k: int(k.split("layers.")[1].split(".")[0]) for k in full if "layers." in k}
    assert set(cut) == {k for k in full if layer_of.get(k, -1) < KEEP}
    assert {layer_of[k] for k in cut if k in layer_of} == set(range(KEEP))
    assert "model.embed_tokens.weight" in cut and "model.norm.weight" in cut
    assert all(np.array_equal(cut[k], full[k]) for k in cut)
    # Tokenizer and template come along; the source's "prepared" marker does not (prepare_reward writes its own).
    assert (cut_dir / "tokenizer.json").read_text() == '{"stand-in": true}'
    assert (cut_dir / "chat_template.jinja").is_file() and not (cut_dir / MARKER).exists()
    assert not cut_dir.with_name(cut_dir.name + ".part").exists()


def test_truncated_folder_computes_the_first_layers_then_the_final_norm(full_dir, cut_dir):
    full = transformers.AutoModel.from_pretrained(full_dir).eval()
    # Strict loading: a missing or unexpected weight is an error here, as it is in vLLM's loader.
    cut, info = transformers.AutoModel.from_pretrained(cut_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert cut.config.num_hidden_layers == KEEP and len(cut.layers) == KEEP
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 12))
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 1, ...]
        expect = full.norm(states[KEEP])  # what the pooling worker returns: the model's last layer, then its norm
        got = cut.eval()(input_ids=ids).last_hidden_state
        deeper = full(input_ids=ids).last_hidden_state
    assert torch.allclose(got, expect, atol=1e-5)
    assert not torch.allclose(got, deeper, atol=1e-2)  # and it is not the full model's output


def test_refuses_impossible_depths(full_dir, tmp_path):
    for k in (0, LAYERS + 1):
        with pytest.raises(ValueError, match="layers"):
            truncate_layers(full_dir, tmp_path / f"bad{k}", k)


def test_meter_reads_the_truncated_depth(full_dir, cut_dir):
    full, cut = ModelShape.from_path(full_dir), ModelShape.from_path(cut_dir)
    assert (full.n_layer, cut.n_layer) == (LAYERS, KEEP)
    # Every term of a pooling pass is per layer: reward FLOPs scale exactly with k / n (no logits are computed).
    for tokens in (1, 40, 300):
        assert cut.encode_flops(tokens) == pytest.approx(full.encode_flops(tokens) * KEEP / LAYERS, rel=1e-12)
    smollm2_30 = ModelShape.from_config(dict(CONFIG, num_hidden_layers=30, vocab_size=49152))
    smollm2_10 = ModelShape.from_config(dict(CONFIG, num_hidden_layers=10, vocab_size=49152))
    assert smollm2_10.encode_flops(100) / smollm2_30.encode_flops(100) == pytest.approx(1 / 3)


def test_meter_matches_the_flop_counter_on_the_truncated_model(cut_dir):
    from torch.utils.flop_counter import FlopCounterMode

    model = transformers.AutoModel.from_pretrained(cut_dir, attn_implementation="eager").eval()
    shape = ModelShape.from_path(cut_dir)
    n = 64
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.randint(0, CONFIG["vocab_size"], (1, n)))  # no lm_head: a pooling pass
    # Eager attention also multiplies the masked half of the score matrix, which a causal kernel skips.
    masked_half = 2.0 * shape.n_layer * shape.d_attn * n * (n - 1)
    counted = float(counter.get_total_flops())
    assert shape.encode_flops(n) + masked_half == pytest.approx(counted, rel=2e-3)


def test_prepare_reward_writes_once_and_leaves_full_depth_alone(full_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    src = models / "tiny"
    import shutil

    shutil.copytree(full_dir, src)
    monkeypatch.setattr(prepare_models, "prepare", lambda name, d: d / name)  # the policy folder is prepared
    out = prepare_reward("tiny", KEEP, models)
    assert out == models / "tiny-2l" and ModelShape.from_path(out).n_layer == KEEP
    assert json.loads((out / MARKER).read_text())["layers"] == KEEP

    def boom(*a):
        raise AssertionError("rewritten")

    monkeypatch.setattr(prepare_models, "truncate_layers", boom)
    assert prepare_reward("tiny", KEEP, models) == out  # idempotent: the marker says it is done
    assert prepare_reward("tiny", None, models) == src and prepare_reward("tiny", LAYERS, models) == src


def _save_head(path: Path, layers: int | None) -> Path:
    meta = {"step_delimiter": "\n", **({"layers": layers} if layers else {})}
    PRMHead(np.zeros(3), np.ones(3), np.zeros(3), 0.0, metadata=meta).save(path)
    return path


def test_gateway_serves_the_depth_the_head_was_trained_on(tmp_path):
    from service.gateway import check_head_layers, reward_model

    s = Settings(models_dir=tmp_path, prm_head_path=str(_save_head(tmp_path / "h10.npz", 10)))
    assert reward_model(s) == str(tmp_path / "smollm2-135m-instruct-10l")
    old = Settings(models_dir=tmp_path, prm_head_path=str(_save_head(tmp_path / "old.npz", None)))
    assert reward_model(old) == str(tmp_path / "smollm2-135m-instruct")  # heads before truncation: all layers
    explicit = Settings(models_dir=tmp_path, prm_head_path=str(tmp_path / "h10.npz"), reward={"model": "/m"})
    assert reward_model(explicit) == "/m"
    check_head_layers(10, 10, "head", "m")
    check_head_layers(None, 30, "head", "m")
    with pytest.raises(ValueError, match="after 10 layers.*has 30"):
        check_head_layers(10, 30, "PRM head h10.npz", "/m")


def test_a_table_fitted_with_another_head_is_flagged(tmp_path):
    import hashlib

    from service.gateway import stale_table_head

    head = _save_head(tmp_path / "prm_head.npz", 10)
    same = f"prm_head.npz sha256:{hashlib.sha256(head.read_bytes()).hexdigest()[:16]}"
    assert stale_table_head(same, head) is None and stale_table_head(None, head) is None
    msg = stale_table_head("prm_head.npz sha256:4671b528731e37bb", head)
    assert msg and "4671b528731e37bb" in msg and same in msg and "refit" in msg
