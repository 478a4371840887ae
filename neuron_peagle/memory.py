"""What an engine's weights, KV caches and state will take, from the configs alone, against the memory
this machine has: a request that cannot fit is refused, with the numbers, before anything is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neuron_peagle.config import BuildConfig, DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes (a tied LM head is the embedding matrix: counted once)
    kv_cache: int  # bytes: target and drafter caches, every layer, [B, kv_heads, max_length, head_dim]
    checkpoint: int  # bytes of the weight files, read whole while loading

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.checkpoint

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, KV caches {self.kv_cache / GIB:.2f}, "
                f"checkpoint being read {self.checkpoint / GIB:.2f})")


def _layer_params(hidden_in: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    attention = hidden_in * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    return attention + 3 * hidden * intermediate + 2 * hidden


def _target_layer_params(model: ModelConfig) -> int:
    """Every decoder layer's parameters; a mixture-of-experts layer holds all its experts and router."""
    m = model
    total = 0
    for i in range(m.num_hidden_layers):
        sparse = m.moe is not None and m.moe.sparse_layers[i]
        total += _layer_params(m.hidden_size, m.hidden_size, m.num_attention_heads, m.num_key_value_heads,
                               m.head_dim, 0 if sparse else m.intermediate_size)
        if sparse:
            total += m.moe.num_experts * (3 * m.hidden_size * m.moe.expert_intermediate_size + m.hidden_size)
    return total


def estimate(model: ModelConfig, build: BuildConfig, drafter: DrafterConfig | None = None,
             checkpoint_bytes: int = 0) -> MemoryEstimate:
    # The models are built in float32 and cast to the build's dtype once loaded: the peak is float32.
    itemsize = 4
    heads = 1 if model.tie_word_embeddings else 2  # embedding, and the LM head unless it is the embedding
    params = heads * model.vocab_size * model.hidden_size + model.hidden_size + _target_layer_params(model)
    slots = build.batch_size * build.max_length
    # Sliding-window layers keep a ring of about the window's size (plus K), not max_length.
    window = model.sliding_window or 0
    layer_slots = sum(build.batch_size * min(build.max_length, window + 16) if sliding else slots
                      for sliding in model.sliding_layers)
    kv = 2 * layer_slots * model.num_key_value_heads * model.head_dim
    if drafter is not None:
        d = drafter
        params += (3 * d.target_hidden_size * d.hidden_size + d.draft_vocab_size * d.hidden_size
                   + d.vocab_size * d.hidden_size * (not d.shares_target_embedding))
        params += sum(_layer_params(2 * d.hidden_size if i == 0 else d.hidden_size, d.hidden_size,
                                    d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.intermediate_size)
                      for i in range(d.num_layers))
        kv += 2 * d.num_layers * slots * d.num_key_value_heads * d.head_dim
    return MemoryEstimate(params * itemsize, kv * itemsize, checkpoint_bytes)


def available_bytes() -> int | None:
    """Memory the machine can give now (MemAvailable), or None where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model: ModelConfig, build: BuildConfig, drafter: DrafterConfig | None = None,
               checkpoint_bytes: int = 0, copies: int = 1) -> MemoryEstimate:
    """Raise ConfigError, naming the numbers and the settings that drive them, if the engine (`copies`
    of it at once: one per tensor-parallel rank on this host, each loading the whole model) cannot fit."""
    need = estimate(model, build, drafter, checkpoint_bytes)
    have = available_bytes()
    if have is not None and need.total * copies > have:
        times = f"{copies} x " if copies > 1 else ""
        raise ConfigError(f"this engine needs about {times}{need.describe()}, more than the {have / GIB:.2f} GiB of memory "
                          f"available; lower max_length ({build.max_length}) or batch_size ({build.batch_size})")
    return need
