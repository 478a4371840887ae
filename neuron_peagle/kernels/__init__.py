"""NKI kernels for the fused draft pass, each next to the plain PyTorch function it replaces.

- `draft_input`: drafter layer 0's [slots, 2H] input (fc over the target features or fc(mask_hidden),
  token or mask embedding, both RMSNorms, the concat) and its residual (`first_layer_input.py`).
- `lm_head_argmax`: LM head + greedy argmax (+ the draft-to-target vocabulary map) without writing
  the [rows, vocab] logits to HBM (`lm_head.py`).

Which implementation runs is the kernel mode, one of `KERNEL_MODES`:
- "reference": the plain PyTorch functions; the default everywhere, and what eager and xla trace.
- "nki": the kernels under `nki.jit`, called on XLA tensors inside a traced graph, where they become
  custom calls in the same NEFF (the neuron backend; needs the Neuron SDK's `nki`).
- "interpreter": the same kernel source on the CPU interpreter (`interpreter.py`), on CPU tensors in
  eager graphs: slow, for tests, which so check the kernels inside the real speculative step.
The mode is one switch, `BuildConfig.kernels` ("auto": "nki" on the neuron backend, else "reference"),
so the compile manifest records it with the other build settings; the graphs that use kernels keep it as
their `kernels` attribute (`DrafterProposer.kernels`, `SpecStepGraph.kernels`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from neuron_peagle.config import KERNEL_MODES
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.kernels.first_layer_input import DraftInputParams, draft_input_kernel, draft_input_reference
from neuron_peagle.kernels.lm_head import (MAX_VOCAB, lm_head_argmax_d2t_kernel, lm_head_argmax_kernel,
                                           lm_head_argmax_reference)
from neuron_peagle.kernels.nki_api import HAVE_NKI

__all__ = ["KERNEL_MODES", "DraftInputParams", "check_kernel_mode", "draft_input", "draft_input_call",
           "lm_head_argmax", "lm_head_argmax_call"]


def check_kernel_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "nki" and not HAVE_NKI:
        raise BackendUnavailableError(
            "kernels='nki' needs the Neuron SDK's nki package (on a trn instance); elsewhere use "
            "'reference', or 'interpreter' to run the kernel source on CPU")
    return mode


def draft_input(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams,
                mode: str = "reference") -> tuple[Tensor, Tensor]:
    # embeds [..., H] token embeddings; features [..., 3H_t]; is_mask [...] bool
    # -> x [..., 2H] (drafter layer 0's input), residual [..., H]
    if mode == "reference":
        return draft_input_reference(embeds, features, is_mask, params)
    lead, hidden = embeds.shape[:-1], embeds.shape[-1]
    x, residual = _launch(mode, *draft_input_call(embeds, features, is_mask, params))
    return x.to(embeds.dtype).reshape(*lead, 2 * hidden), residual.to(embeds.dtype).reshape(*lead, hidden)


def draft_input_call(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams
                     ) -> tuple[Callable, tuple]:
    """The kernel and its arguments: slots flattened to rows, vectors as [1, H] rows, a float mask."""
    hidden = embeds.shape[-1]
    weight = params.fc_weight

    def row(t: Tensor) -> Tensor:  # [H] -> [1, H]
        return t.reshape(1, hidden)

    return draft_input_kernel, (
        embeds.reshape(-1, hidden), features.reshape(-1, features.shape[-1]).to(weight.dtype),
        is_mask.reshape(-1, 1).to(torch.float32), weight, row(params.fc_mask_row),
        row(params.mask_embedding.to(embeds.dtype)), row(params.input_layernorm.weight),
        row(params.hidden_norm.weight), float(params.input_layernorm.eps), float(params.hidden_norm.eps),
        bool(params.norm_before_residual))


def lm_head_argmax(hidden: Tensor, weight: Tensor, d2t: Tensor | None = None, mode: str = "reference"
                   ) -> tuple[Tensor, Tensor]:
    # hidden [..., H] final-normed rows; weight [H, vocab] ([in, out]); d2t [vocab] int64 or None
    # -> token ids [...] int64 (mapped through d2t), their logits [...] float32
    if mode == "reference":
        return lm_head_argmax_reference(hidden, weight, d2t)
    ids, best = _launch(mode, *lm_head_argmax_call(hidden, weight, d2t))
    lead = hidden.shape[:-1]
    return ids.reshape(lead).long(), best.reshape(lead).float()


def lm_head_argmax_call(hidden: Tensor, weight: Tensor, d2t: Tensor | None) -> tuple[Callable, tuple]:
    """The kernel (with or without the vocabulary map) and its arguments, rows flattened."""
    if weight.shape[1] >= MAX_VOCAB:
        raise ConfigError(f"the argmax kernel keeps indices exact in float32 up to {MAX_VOCAB} tokens, "
                          f"got a vocabulary of {weight.shape[1]}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    if d2t is None:
        return lm_head_argmax_kernel, (rows, weight)
    return lm_head_argmax_d2t_kernel, (rows, weight, d2t.to(torch.int32).reshape(-1, 1))


def _launch(mode: str, kernel: Callable, args: tuple) -> tuple[Tensor, ...]:
    if mode == "nki":
        return tuple(_jit(kernel)(*args))
    from neuron_peagle.kernels import interpreter

    return tuple(torch.from_numpy(out) for out in interpreter.run(kernel, *args))


@functools.cache
def _jit(kernel: Callable) -> Callable:
    from neuron_peagle.kernels.nki_api import nki

    return nki.jit(kernel)
