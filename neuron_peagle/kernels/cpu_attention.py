"""The CPU backends' attention over a KV cache for decode-sized steps (bfloat16 and float32).

A compiled step attends over every slot of the cache (its shape is fixed at max_length) and masks the
slots past each query's position; on 2 cores the small batched matmuls and the masked softmax over all
slots took about a fifth of a P-EAGLE step (BENCHMARKS.md, "Where a decode step's milliseconds go").
`cpu_attention.cpp` reads, for each query row, only the slots up to its position: one custom op,
`neuron_peagle_cpu::decode_attention`, that a compiled graph calls as one node (kernels/cpu_ops.py builds
it and gives its shapes). Its rounding follows `Attention.attend` (scores and probabilities rounded to the
cache dtype, softmax and accumulation in float32), and a row's result does not depend on the others.

Only the CPU backends use it (eager and inductor), through `CacheAttention`, which they swap in for the
models' Attention modules; only for steps of at most MAX_ROWS query rows per KV head (a prefill keeps the
batched matmuls), head dims up to 128, without attention sinks or sliding windows (those keep
`Attention.attend`), and where the CPU kernels run.
"""

from __future__ import annotations

from torch import Tensor, nn

from neuron_peagle.kernels.cpu_ops import DTYPES, built_ops, cpu_ops
from neuron_peagle.models.layers import Attention

MAX_ROWS = 64  # query rows per KV head (groups x tokens per step): decode and verify steps, not prefill
MAX_HEAD_DIM = 128


def _applies(q: Tensor, keys: Tensor, values: Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in DTYPES and keys.dtype == q.dtype == values.dtype
            and q.shape[2] <= MAX_ROWS and q.shape[3] <= MAX_HEAD_DIM
            and keys.stride(3) == 1 and values.stride(3) == 1 and keys.stride(2) == values.stride(2))


class CacheAttention(Attention):
    """An Attention whose decode-sized steps attend through the kernel (same parameters and state dict)."""

    def attend_cache(self, q: Tensor, keys: Tensor, values: Tensor, position_ids: Tensor) -> Tensor:
        ops = built_ops() if _applies(q, keys, values) else None  # a dict read: what a traced graph sees
        if ops is None:
            return super().attend_cache(q, keys, values, position_ids)
        return ops.decode_attention(q, keys, values, position_ids)


def use_cache_attention(module: nn.Module) -> int:
    """Every Attention of `module` without sinks or a sliding window a CacheAttention, in place, where the
    kernel runs here; returns how many were."""
    layers = [m for m in module.modules() if type(m) is Attention and m.sinks is None and m.sliding_window is None]
    if not layers or cpu_ops() is None:
        return 0
    for layer in layers:
        layer.__class__ = CacheAttention
    return len(layers)
