"""Running a kernel's source on PyTorch tensors: its arguments, its launch, its outputs.

`draft_input_call` / `lm_head_argmax_call` turn the reference functions' arguments into the kernels'
(slots flattened to rows, vectors as [1, H] rows, a float mask, an int32 vocabulary map, and each
weight as the kernel streams it: [in, out], the Tensor Engine's moving operand, a transposed view of
nn.Linear's [out, in]. On CPU the view costs nothing. On a NeuronCore it is a transpose in the graph
ahead of the kernel, which the compiler may or may not fold into the weight's layout: never measured);
`run_draft_input` / `run_lm_head_argmax` launch the kernel, under `nki.jit` ("nki") or on the CPU
interpreter ("interpreter"), at the build's logical NeuronCore degree (`lnc`, neuron_peagle/lnc.py:
`kernel[lnc]`, the kernels split their row tiles between the physical cores), and give its outputs the
shapes and dtypes of the reference's, so every implementation of a kernel has the same output contract.

Under `torch.compile(backend="neuron")` the `nki.jit` kernel called here, on neuron tensors inside the
compiled region, is TorchNeuron's documented route: the call becomes one node of the captured graph
(`torch.ops.higher_order.nki_kernel_wrapper`), which its lowering turns into the kernel's custom call in
the NEFF. On trn1's XLA tensors the same call becomes a custom call of the traced HLO.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from neuron_peagle.errors import ConfigError
from neuron_peagle.kernels.first_layer_input import DraftInputParams, draft_input_kernel
from neuron_peagle.kernels.lm_head import MAX_VOCAB, lm_head_argmax_d2t_kernel, lm_head_argmax_kernel

LAUNCH_MODES = ("nki", "interpreter")


def draft_input_call(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams
                     ) -> tuple[Callable, tuple]:
    """The kernel and its arguments: slots flattened to rows, vectors as [1, H] rows, a float mask."""
    hidden = embeds.shape[-1]
    weight = params.fc_weight.t()  # [3H_t, H]: the kernel's [in, out]

    def row(t: Tensor) -> Tensor:  # [H] -> [1, H]
        return t.reshape(1, hidden)

    return draft_input_kernel, (
        embeds.reshape(-1, hidden), features.reshape(-1, features.shape[-1]).to(weight.dtype),
        is_mask.reshape(-1, 1).to(torch.float32), weight, row(params.fc_mask_row),
        row(params.mask_embedding.to(embeds.dtype)), row(params.input_layernorm.weight),
        row(params.hidden_norm.weight), float(params.input_layernorm.eps), float(params.hidden_norm.eps),
        bool(params.norm_before_residual))


def lm_head_argmax_call(hidden: Tensor, weight: Tensor, d2t: Tensor | None) -> tuple[Callable, tuple]:
    """The kernel (with or without the vocabulary map) and its arguments, rows flattened."""
    if weight.shape[0] >= MAX_VOCAB:
        raise ConfigError(f"the argmax kernel keeps indices exact in float32 up to {MAX_VOCAB} tokens, "
                          f"got a vocabulary of {weight.shape[0]}")
    weight = weight.t()  # [H, vocab]: the kernel's [in, out]
    rows = hidden.reshape(-1, hidden.shape[-1])
    if d2t is None:
        return lm_head_argmax_kernel, (rows, weight)
    return lm_head_argmax_d2t_kernel, (rows, weight, d2t.to(torch.int32).reshape(-1, 1))


def run_draft_input(mode: str, embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams,
                    lnc: int = 1) -> tuple[Tensor, Tensor]:
    # embeds [..., H]; features [..., 3H_t]; is_mask [...] bool -> x [..., 2H], residual [..., H] (embeds' dtype)
    lead, hidden = embeds.shape[:-1], embeds.shape[-1]
    x, residual = launch(mode, *draft_input_call(embeds, features, is_mask, params), lnc=lnc)
    return x.to(embeds.dtype).reshape(*lead, 2 * hidden), residual.to(embeds.dtype).reshape(*lead, hidden)


def run_lm_head_argmax(mode: str, hidden: Tensor, weight: Tensor, d2t: Tensor | None, lnc: int = 1
                       ) -> tuple[Tensor, Tensor]:
    # hidden [..., H]; weight [vocab, H]; d2t [vocab] or None -> ids [...] int64, logits [...] float32
    ids, best = launch(mode, *lm_head_argmax_call(hidden, weight, d2t), lnc=lnc)
    lead = hidden.shape[:-1]
    return ids.reshape(lead).long(), best.reshape(lead).float()


def launch(mode: str, kernel: Callable, args: tuple, lnc: int = 1) -> tuple[Tensor, ...]:
    """The kernel's outputs as tensors: compiled by `nki.jit` ("nki"), or run on the CPU interpreter, on
    `lnc` physical NeuronCores (the graph's LNC, which the kernel's must equal)."""
    if mode == "nki":
        jitted = _jit(kernel)
        # kernel[lnc]: NKI's launch at an LNC degree (its default is 1; trn1's NKI 0.5 reads a bracket as an
        # SPMD grid, so LNC 1 launches without one)
        return tuple((jitted[lnc] if lnc != 1 else jitted)(*args))
    if mode != "interpreter":
        raise ConfigError(f"a kernel launches in one of {LAUNCH_MODES}, got {mode!r}")
    from neuron_peagle.kernels.interpreter import run

    return tuple(torch.from_numpy(out) for out in run(kernel, *args, lnc=lnc))


@functools.cache
def _jit(kernel: Callable) -> Callable:
    from neuron_peagle.kernels.nki_api import nki

    return nki.jit(kernel)
