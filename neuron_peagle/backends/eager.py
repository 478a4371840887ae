"""Eager PyTorch on CPU, op by op: the reference path every compiled backend is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from neuron_peagle.backends.base import held_modules
from neuron_peagle.backends.cpu_modules import prepare_cpu_modules
from neuron_peagle.capabilities import BACKENDS
from neuron_peagle.errors import ConfigError
from neuron_peagle.state_writes import StateWrites, use_state_writes

NO_ARTIFACTS = "the eager backend compiles nothing, so it has no artifacts: build them for inductor (or xla, neuron, nxd)"


class EagerBackend:
    name = "eager"
    device = torch.device("cpu")
    capabilities = BACKENDS["eager"]

    def prepare(self, graphs: Sequence[nn.Module]) -> None:
        """CPU weight layout, matmuls and attention (`cpu_modules.prepare_cpu_modules`); nothing to move. State
        is written in place, 16-bit caches through an int16 view (neuron_peagle.state_writes: PyTorch's CPU
        scatter over 16-bit floats copies the whole cache)."""
        held = held_modules(graphs)
        prepare_cpu_modules(held, graphs)
        use_state_writes(held, StateWrites.IN_PLACE_INT16)

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        # Shapes cost nothing here: attention reads only the cache slots the call can see (rounded up),
        # not all of max_length as a compiled graph must.
        cache = getattr(graph, "target_cache", None)
        if cache is not None:
            cache.read_length = cache.rounded_read_length(graph.cache_extent(inputs))
        with torch.inference_mode():
            return graph(*inputs)

    def compile_count(self) -> int:
        return 0

    def use_artifacts(self, directory: Path, writable: bool) -> str:
        raise ConfigError(NO_ARTIFACTS)

    def build_artifacts(self, plan, build):
        raise ConfigError(NO_ARTIFACTS)

    def load_artifacts(self, directory, plan, manifest):
        raise ConfigError(NO_ARTIFACTS)

    def profiler(self, out_dir: Path, trace: bool):
        from neuron_peagle.backends.profilers import profiler_for

        return profiler_for(self.capabilities.on_neuron_cores, out_dir, trace)
