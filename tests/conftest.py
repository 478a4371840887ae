"""Shared fixtures: tiny random-weight Hugging Face model directories and the default model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PJRT_DEVICE", "CPU")
# NEURON_PEAGLE_TEST_THREADS leaves a core free for other work (timings then mean less).
torch.set_num_threads(int(os.environ.get("NEURON_PEAGLE_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_tiny_model(path: Path, family: str = "llama", tie: bool = True, seed: int = 0,
                    rope_scaling: dict | None = None, vocab_size: int = 49152, **shape) -> Path:
    """A small random model saved the way users bring theirs: config.json + model.safetensors.
    `shape` overrides config fields (heads, head_dim, widths).

    It borrows the default model's tokenizer (same vocabulary size) so the whole engine runs on it.
    """
    from transformers import (GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    common.update(shape)
    if family == "llama":
        config = LlamaConfig(**common, rope_theta=10000.0, rope_scaling=rope_scaling)
        model = LlamaForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(**common, rope_theta=10000.0)
        model = Qwen2ForCausalLM(config)
    elif family == "qwen3":  # q/k norms per head; head_dim is its own field (its default, 128, is too big here)
        config = Qwen3Config(**{"head_dim": 16, **common}, rope_theta=10000.0)
        model = Qwen3ForCausalLM(config)
    elif family == "qwen3_moe":  # 8 experts of width 32, 2 per token, renormalised; q/k norms
        config = Qwen3MoeConfig(**{"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                                   "moe_intermediate_size": 32, "norm_topk_prob": True, **common}, rope_theta=10000.0)
        model = Qwen3MoeForCausalLM(config)
    elif family == "gpt_oss":  # sinks, sliding window 8 on even layers, YaRN, biases, 8 experts (2 per token)
        common.pop("intermediate_size")
        config = GptOssConfig(**{"head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                                 "intermediate_size": 32, "sliding_window": 8, **common},
                              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                               "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                               "original_max_position_embeddings": 64})
        model = GptOssForCausalLM(config)
    else:
        raise ValueError(f"no tiny {family!r} model")
    # Random init is small around zero; widen it so logits are well separated and argmax is stable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "bias" not in str(p.shape):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    from neuron_peagle.default_model import require_default_model

    source = require_default_model()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return path


def edited_model_dir(source: Path, dest: Path, config_edit=None, files: dict[str, str] | None = None) -> Path:
    """A model directory linking to `source`'s files, with config.json replaced by
    `config_edit(config)` (a dict, or anything to write as JSON) and `files` (name -> text) written."""
    dest.mkdir(parents=True)
    replaced = set(files or {}) | ({"config.json"} if config_edit else set())
    for item in source.iterdir():
        if item.name not in replaced:
            (dest / item.name).symlink_to(item)
    if config_edit:
        config = json.loads((source / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps(config_edit(config)))
    for name, text in (files or {}).items():
        (dest / name).write_text(text)
    return dest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tie=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from neuron_peagle.default_model import require_default_model

    return require_default_model()


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


NEW_TOKENS = 64  # continuation length of the exactness tests


@pytest.fixture(scope="session")
def prompt_ids(default_model_dir):
    """The twenty test prompts, chat template applied, as the engine encodes them."""
    from prompts import PROMPTS
    from neuron_peagle.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.fixture(scope="session")
def hf_greedy(hf_default_model, prompt_ids):
    """transformers' greedy continuation of each prompt, one at a time (no padding involved)."""
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            # The prompt contains token 2 (<|im_end|>), which is also the pad id: give the mask
            # explicitly or transformers infers one that hides those tokens.
            ids_t = torch.tensor([ids])
            out = hf_default_model.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                            max_new_tokens=NEW_TOKENS, do_sample=False,
                                            eos_token_id=None, pad_token_id=2)
            outputs.append(out[0, len(ids):].tolist())
    return outputs
