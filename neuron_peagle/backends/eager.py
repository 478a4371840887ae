"""Eager PyTorch on CPU, op by op: the reference path every compiled backend is tested against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuron_peagle.state_writes import StateWrites, use_state_writes


class EagerBackend:
    name = "eager"
    device = torch.device("cpu")

    def prepare(self, module: nn.Module, rows_per_call: int = 1) -> nn.Module:
        """CPU weight layout (`layout.cpu_weight_layout`), and KV caches that may narrow their reads to the
        live context: eager has no compiled shapes to keep."""
        from neuron_peagle.backends.layout import cpu_weight_layout
        from neuron_peagle.kv_cache import KVCache

        use_state_writes(module, StateWrites.IN_PLACE_INT16)
        for layer in module.modules():
            if isinstance(layer, KVCache):
                layer.narrows = True
        return cpu_weight_layout(module, rows_per_call)

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        with torch.inference_mode():
            return graph(*inputs)

    def compile_count(self) -> int:
        return 0

