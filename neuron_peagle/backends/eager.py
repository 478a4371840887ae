"""Eager PyTorch on CPU, op by op: the reference path every compiled backend is tested against."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EagerBackend:
    name = "eager"
    device = torch.device("cpu")

    def prepare(self, module: nn.Module) -> nn.Module:
        """CPU weight layout (`cpu_weight_layout`), and KV caches that may narrow their reads to the
        live context: eager has no compiled shapes to keep."""
        from neuron_peagle.kv_cache import KVCache

        for layer in module.modules():
            if isinstance(layer, KVCache):
                layer.narrows = True
        return cpu_weight_layout(module)

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        with torch.inference_mode():
            return graph(*inputs)

    def compile_count(self) -> int:
        return 0


def cpu_weight_layout(module: nn.Module) -> nn.Module:
    """bf16 Linear weights go column-major on CPU: the same [in, out] tensor, stored as [out, in].
    oneDNN's bf16 matmul at decode shapes is up to 4x faster that way (the 49152-wide LM head: 13 -> 3
    ms at one row); float32 keeps row-major, which is faster there and what the exactness tests use.
    Eager and inductor (whose matmuls are the same oneDNN calls) both use it."""
    from neuron_peagle.models.layers import Linear

    for layer in module.modules():
        if isinstance(layer, Linear) and layer.weight.dtype == torch.bfloat16 and layer.weight.stride(0) != 1:
            layer.weight = nn.Parameter(layer.weight.t().contiguous().t(), requires_grad=False)
    return module
