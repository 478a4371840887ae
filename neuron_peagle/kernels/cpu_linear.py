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
calls, prefill, stay with F.linear, whose blocked kernels win there) on a row-major weight (a float32
weight stored column-major for one-row plain decoding keeps MKL's one-row kernel: layout.py), only where
the CPU has AVX512-BF16 (the bf16 dot products; one build serves both dtypes). It is compiled once per
machine at first use (a few seconds, into PyTorch's extension cache, with ninja); where it cannot be
built or the CPU lacks the instructions, F.linear runs instead and one line on stderr says why.
NEURON_PEAGLE_ROWS_LINEAR=off turns it off.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F


MAX_ROWS = 8  # measured: above it F.linear is faster (BENCHMARKS.md)
SOURCE = Path(__file__).with_name("cpu_rows_linear.cpp")
LIBRARY = "neuron_peagle_cpu"
DTYPES = (torch.bfloat16, torch.float32)
SWITCH = "NEURON_PEAGLE_ROWS_LINEAR"  # "off": never use it (F.linear everywhere)


_built: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor] | None] = {}  # "op": built or None


def rows_linear_op() -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """The built op, or None (said once on stderr) where it cannot run here. Built on first call (the
    CPU backends call it while preparing, before anything is traced)."""
    if "op" not in _built:
        _built["op"] = _build()
    return _built["op"]


def _build() -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    import os
    import platform

    if os.environ.get(SWITCH, "on") == "off":
        return None  # asked for: F.linear everywhere (the benchmarks' "before")

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch.utils.cpp_extension import load

        load(name="neuron_peagle_cpu_rows_linear", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, an old compiler: F.linear still works
        print(f"[neuron_peagle: the CPU row matmul could not be built ({type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}); decode matmuls use F.linear]",
              file=sys.stderr, flush=True)
        return None
    ops = getattr(torch.ops, LIBRARY)
    if not ops.supported():
        print("[neuron_peagle: this CPU has no AVX512-BF16; decode matmuls use F.linear]", file=sys.stderr, flush=True)
        return None

    @torch.library.register_fake(f"{LIBRARY}::rows_linear")  # once: _build runs once per process
    def _fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        torch._check(x.shape[-1] == weight.shape[1], lambda: f"x {x.shape} @ weight {weight.shape}.T")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return ops.rows_linear


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through the row matmul where it applies (CPU, bfloat16 or float32, at most MAX_ROWS rows,
    a row-major weight) and was built (`rows_linear_op`)."""
    op = _built.get("op") if _applies(x, weight) else None  # a dict read: what a traced graph sees
    return F.linear(x, weight, bias) if op is None else op(x, weight, bias)


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
