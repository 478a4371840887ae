"""Where a weight sits in memory: the backend's choice, never the model's.

The models hold every linear weight in nn.Linear's [out, in] shape (the checkpoints' layout), and a
tied LM head is the embedding matrix itself. A backend may store a weight with other strides, same
shape and values, for its own matmuls:

- CPU (eager, and inductor, whose matmuls are the same calls): the fast strides depend on the dtype,
  on how many rows a decode-time matmul multiplies (`rows_per_call`: batch x tokens per step, as the
  step graphs declare it in `rows_per_step`) and on whether the row matmul (`kernels/cpu_linear.py`)
  runs here. It reads row-major weights and beats oneDNN and MKL at 1-8 rows in both dtypes, so where it
  runs every weight stays row-major. Without it, float32 weights go column-major where a call multiplies
  one row (plain decoding at batch 1): MKL's one-row kernel decodes 1.24-1.39x faster on them, P-EAGLE's
  8-row verify 6-9% slower, and row-major bfloat16 is 1.08-1.23x faster than column-major in both
  (BENCHMARKS.md, "Weight layout on CPU"). A tied head moves with the embedding it shares: gathering
  rows from a column-major matrix costs about 1 ms per 512-token prefill.
- XLA (trn1, and torch-xla on CPU) and TorchNeuron: the compiler lays weights out; nothing is moved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rows_per_call(graphs: Sequence[nn.Module]) -> int:
    """The rows a decode-time matmul of these graphs multiplies: the most any per-step graph declares
    (`rows_per_step`: batch x tokens per step); a prefill graph declares none."""
    return max((graph.rows_per_step for graph in graphs if getattr(graph, "rows_per_step", None)), default=1)


def column_major_on_cpu(dtype: torch.dtype, rows_per_call: int, row_matmul: bool) -> bool:
    """Whether the CPU backends store a linear weight of this dtype column-major (`row_matmul`: the row
    matmul runs here)."""
    return dtype == torch.float32 and rows_per_call == 1 and not row_matmul


def strided(matrix: torch.Tensor, column_major: bool) -> torch.Tensor:
    """The same [out, in] matrix stored column-major (memory [in, out]) or row-major; itself if it is."""
    if column_major:
        return matrix if matrix.stride(0) == 1 else matrix.t().contiguous().t()
    return matrix.contiguous()


def cpu_weight_layout(module: nn.Module, rows_per_call: int = 1, row_matmul: bool = False) -> nn.Module:
    """Give every local nn.Linear weight its fast CPU strides, in place (shared weights stay shared)."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        weight = layer.weight
        weight.data = strided(weight.data, column_major_on_cpu(weight.dtype, rows_per_call, row_matmul))
    return module
