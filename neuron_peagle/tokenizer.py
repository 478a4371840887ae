"""Tokenizers come from transformers, loaded from the model directory only (never from a hub)."""

from __future__ import annotations

from pathlib import Path

from neuron_peagle.errors import ModelDirError


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelDirError(f"model directory {str(path)!r} has no tokenizer files (tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # a corrupt tokenizer file surfaces as any of tokenizers' or transformers' errors
        raise ModelDirError(f"model directory {str(path)!r}: its tokenizer cannot be loaded "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """A user prompt as token ids: in the model's chat template (as a user turn, ready for the
    assistant's answer) when it has one and `chat_template` is set, else the plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(prompt, add_special_tokens=False)
