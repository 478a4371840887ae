"""Where a weight sits in memory: the backend's choice, never the model's.

The models hold every linear weight in nn.Linear's [out, in] shape (the checkpoints' layout), and a
tied LM head is the embedding matrix itself. A backend may store a weight with other strides, same
shape and values, for its own matmuls:

- CPU (eager, and inductor, whose matmuls are the same oneDNN calls): float32 weights go column-major
  (memory [in, out]), which streams about twice as fast at one row (SmolLM2's 49152 x 576 LM head:
  10.2 -> 5.0 ms on 2 cores; even at 8 rows), and bfloat16 weights stay row-major, where oneDNN's bf16
  matmul is faster (3.2 ms against 4.5). A tied head moves with the embedding it shares: gathering
  rows from the column-major matrix costs about 1 ms per 512-token prefill and nothing measurable
  per step.
- XLA (trn1, and torch-xla on CPU) and TorchNeuron: the compiler lays weights out; nothing is moved.
"""

from __future__ import annotations

import torch
from torch import nn


def cpu_weight_layout(module: nn.Module) -> nn.Module:
    """Give every local nn.Linear weight its fast CPU strides, in place (shared weights stay shared)."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear) or type(layer.weight.data) is not torch.Tensor:  # DTensor shards: as placed
            continue
        weight = layer.weight
        column_major = weight.dtype == torch.float32
        if column_major and weight.stride(0) != 1:
            weight.data = weight.data.t().contiguous().t()
        elif not column_major and not weight.is_contiguous():
            weight.data = weight.data.contiguous()
    return module
