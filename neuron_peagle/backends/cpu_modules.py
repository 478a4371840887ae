"""What the CPU backends (eager and inductor) do to the modules they hold before anything runs: the weights'
fast strides (layout.py), the decode-sized row matmul for bf16 and float32 linears (kernels/cpu_linear.py), and
attention over the cache through the kernel that reads only the live slots (kernels/cpu_attention.py). Each
keeps the modules' parameters and state dicts; the Neuron backends do none of it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from neuron_peagle.backends.layout import cpu_weight_layout, rows_per_call


def prepare_cpu_modules(held: nn.Module, graphs: Sequence[nn.Module]) -> None:
    from neuron_peagle.kernels.cpu_attention import use_cache_attention
    from neuron_peagle.kernels.cpu_linear import rows_linear_op, use_rows_linear

    cpu_weight_layout(held, rows_per_call(graphs), row_matmul=rows_linear_op() is not None)
    use_rows_linear(held)
    use_cache_attention(held)
