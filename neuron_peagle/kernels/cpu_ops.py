"""The CPU backends' decode-sized kernels, built once per machine: one C++ extension of two ops,
`neuron_peagle_cpu::rows_linear` (cpu_rows_linear.cpp, used by kernels/cpu_linear.py) and
`neuron_peagle_cpu::decode_attention` (cpu_attention.cpp, used by kernels/cpu_attention.py).

It is compiled at first use (a few seconds, into PyTorch's extension cache, with ninja) and only where it
can run: x86-64 with AVX512-BF16 (the bf16 dot products; one build serves both dtypes). Where it cannot be
built or the CPU lacks the instructions, the callers use plain PyTorch and one line on stderr says why.
NEURON_PEAGLE_CPU_KERNELS=off turns both ops off (the benchmarks' "before").
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_rows_linear.cpp", "cpu_attention.cpp")]
LIBRARY = "neuron_peagle_cpu"
DTYPES = (torch.bfloat16, torch.float32)  # what both ops take
SWITCH = "NEURON_PEAGLE_CPU_KERNELS"  # "off": never use them
OLD_SWITCH = "NEURON_PEAGLE_ROWS_LINEAR"  # the earlier name of the switch, still honoured

_built: dict[str, object] = {}  # "ops": torch.ops.neuron_peagle_cpu once built, or None


def cpu_ops():
    """torch.ops.neuron_peagle_cpu, built on first call, or None (said once on stderr) where the kernels
    cannot run here. The CPU backends call it while preparing, before anything is traced; traced code
    reads `_built` only."""
    if "ops" not in _built:
        _built["ops"] = _build()
    return _built["ops"]


def built_ops():
    """The ops if they were built, without building them: what a traced graph may read."""
    return _built.get("ops")


def _build():
    if "off" in (os.environ.get(SWITCH, "on"), os.environ.get(OLD_SWITCH, "on")):
        return None  # asked for: plain PyTorch everywhere
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch.utils.cpp_extension import load

        load(name="neuron_peagle_cpu_kernels", sources=[str(s) for s in SOURCES], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, an old compiler: plain PyTorch still works
        print(f"[neuron_peagle: the CPU kernels could not be built ({type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}); decode matmuls and attention use PyTorch's]",
              file=sys.stderr, flush=True)
        return None
    ops = getattr(torch.ops, LIBRARY)
    if not ops.supported():
        print("[neuron_peagle: this CPU has no AVX512-BF16; decode matmuls and attention use PyTorch's]",
              file=sys.stderr, flush=True)
        return None

    # Shapes for tracing (once: _build runs once per process).
    @torch.library.register_fake(f"{LIBRARY}::rows_linear")
    def _rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        torch._check(x.shape[-1] == weight.shape[1], lambda: f"x {x.shape} @ weight {weight.shape}.T")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(f"{LIBRARY}::decode_attention")
    def _decode_attention(q: Tensor, keys: Tensor, values: Tensor, last: Tensor) -> Tensor:
        torch._check(q.shape[:2] == keys.shape[:2] and q.shape[3] == keys.shape[3], lambda: f"{q.shape} {keys.shape}")
        return q.new_empty(q.shape)

    return ops
