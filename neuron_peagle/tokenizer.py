"""Tokenizers come from transformers, loaded from the model directory only (never from a hub)."""

from __future__ import annotations

from pathlib import Path

from neuron_peagle.errors import ModelDirError


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelDirError(f"model directory {str(path)!r} has no tokenizer files (tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
