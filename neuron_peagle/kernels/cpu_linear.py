"""The CPU backends' linear for decode-sized calls (bfloat16 and float32).

A decode step multiplies every weight matrix by a few rows (one at batch 1; K + 1 in a verify). On
CPU, oneDNN's bfloat16 matmul reads a weight it streams from memory at a third of the bandwidth a
plain sum reaches, and float32 matmuls of 4-8 rows run 3-4x slower than one weight read; those reads are
most of a step (BENCHMARKS.md, "Where a decode step's milliseconds go"). `cpu_rows_linear.cpp` reads each
weight row once, in order, for all the rows of the call (bf16: AVX512-BF16 dot products; float32: FMAs;
float32 accumulation): a custom op `neuron_peagle_cpu::rows_linear` that a compiled graph calls as one
node (its fake implementation below gives the shapes).

Each output row's arithmetic is the same whatever the other rows are (a row of a verify gets the
bits a one-row decode would), and its results are within float32 accumulation of F.linear's.

Only the CPU backends use it (eager and inductor), only for calls of at most `MAX_ROWS` rows (larger
calls, prefill, stay with F.linear, whose blocked kernels win there) on a row-major weight (layout.py
keeps them so where it runs), only where the CPU kernels run (kernels/cpu_ops.py: built once per machine; elsewhere F.linear runs instead).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

from neuron_peagle.kernels.cpu_ops import DTYPES, built_ops, cpu_ops


MAX_ROWS = 8  # measured: above it F.linear is faster (BENCHMARKS.md)


def rows_linear_op() -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """The built op, or None where it cannot run here (built on first call: cpu_ops)."""
    ops = cpu_ops()
    return None if ops is None else ops.rows_linear


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through the row matmul where it applies (CPU, bfloat16 or float32, at most MAX_ROWS rows,
    a row-major weight) and was built (`rows_linear_op`)."""
    ops = built_ops() if _applies(x, weight) else None  # a dict read: what a traced graph sees
    return F.linear(x, weight, bias) if ops is None else ops.rows_linear(x, weight, bias)


def _applies(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DTYPES
            and 0 < rows_of(x) <= MAX_ROWS and weight.dim() == 2 and weight.is_contiguous())


class RowsLinear(nn.Linear):
    """An nn.Linear whose decode-sized calls take the row matmul (same parameters, same state
    dict: the CPU backends turn their nn.Linear modules into this class in place)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_rows_linear(module: nn.Module) -> int:
    """Every bfloat16 and float32 nn.Linear of `module` a RowsLinear, in place, where the row matmul runs
    here; returns how many were."""
    layers = [m for m in module.modules() if type(m) is nn.Linear and m.weight.dtype in DTYPES]
    if not layers or rows_linear_op() is None:
        return 0
    for layer in layers:
        layer.__class__ = RowsLinear
    return len(layers)
