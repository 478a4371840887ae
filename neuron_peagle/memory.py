"""What an engine's weights, KV caches and loading take per rank, counted from the models themselves built
on the meta device with the parallel plan applied (parameters' `numel`, no formula of our own), against
the memory this machine has: a request that cannot fit is refused, with the numbers, before anything is
read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuron_peagle.config import BuildConfig, DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.checkpoint import CHUNK_BYTES
from neuron_peagle.models.drafter import Drafter
from neuron_peagle.models.target import TargetModel
from neuron_peagle.parallel import SINGLE, TensorParallel

GIB = 2**30
SLIDING_STEP_TOKENS = 16  # the most tokens a step writes (K + 1), for the size of sliding-window rings


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes one rank holds (a tied LM head is the embedding matrix: counted once)
    kv_cache: int  # bytes: target and drafter caches, every layer, a rank's KV heads
    loading: int  # bytes held only while loading: the largest layer's tensors being read and fused, a chunk

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.loading

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, KV caches {self.kv_cache / GIB:.2f}, "
                f"while loading {self.loading / GIB:.2f})")


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers, each tensor once (a tied LM head counts once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def meta_target(model: ModelConfig, build: BuildConfig, tp: TensorParallel = SINGLE,
                feature_layers: tuple[int, ...] | None = None) -> nn.Module:
    """The target as rank `tp.rank` builds it, on the meta device: the parallel plan applied, no storage."""
    target = TargetModel.on_meta(model, build.max_length, build.torch_dtype, feature_layers)
    tp.shard(target)
    return target


def estimate(model: ModelConfig, build: BuildConfig, drafter: DrafterConfig | None = None,
             tp: TensorParallel = SINGLE) -> MemoryEstimate:
    """One rank's bytes (every rank holds the same amount)."""
    target = meta_target(model, build, tp, drafter.feature_layers if drafter is not None else None)
    rotary = parameter_bytes(target.rotary)
    weights = parameter_bytes(target) - rotary + rotary // build.torch_dtype.itemsize * 4  # angles: float32
    with torch.device("meta"):
        kv = parameter_bytes(target.new_cache(build.state_rows, SLIDING_STEP_TOKENS))
    if drafter is not None:
        with torch.device("meta"):
            draft = Drafter(drafter, build.max_length).to(build.torch_dtype)
            weights += parameter_bytes(draft)
            kv += parameter_bytes(draft.new_cache(build.state_rows))
    # While loading: a decoder layer's tensors as read (its file pages, the pieces, the fused copies: about
    # three times the layer) and a chunk of a large tensor.
    largest_layer = max(parameter_bytes(layer) for layer in target.layers)
    return MemoryEstimate(weights, kv, 3 * largest_layer + CHUNK_BYTES)


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
               tp: TensorParallel = SINGLE, ranks_here: int = 1) -> MemoryEstimate:
    """Raise ConfigError, naming the numbers and the settings that drive them, if `ranks_here` ranks of the
    engine (the tensor-parallel ranks on this host, each holding its share) cannot fit in this host's memory."""
    need = estimate(model, build, drafter, tp)
    have = available_bytes()
    if have is not None and need.total * ranks_here > have:
        times = f"{ranks_here} ranks x " if ranks_here > 1 else ""
        raise ConfigError(f"this engine needs about {times}{need.describe()}, more than the {have / GIB:.2f} GiB of "
                          f"memory available; lower max_length ({build.max_length}) or batch_size "
                          f"({build.batch_size})" + ("" if tp.degree > 1 else ", or shard it (tp_degree)"))
    return need
