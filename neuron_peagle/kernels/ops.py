"""The two fused draft-pass kernels as PyTorch custom ops, so a compiled CPU graph keeps each one whole.

`torch.compile(fullgraph=True, dynamic=False)` traces through plain Python; through a custom op it
does not: the captured graph holds one `neuron_peagle::lm_head_argmax` and one
`neuron_peagle::draft_input` node, the fake implementations below give the compiler their output
shapes and dtypes, and what runs is the PyTorch reference (`lm_head_argmax_reference`,
`draft_input_reference`), unchanged. Only graphs on CPU (and devices without kernels) use the ops:
TorchNeuron's lowering knows no opaque op, so on its "neuron" device, and on XLA tensors, the kernels
are called inline instead (`neuron_peagle.kernels`: the `nki.jit` kernel, TorchNeuron's route, or the
reference's plain code).

Custom-op signatures take tensors, numbers and bools, not the `DraftInputParams` of nn.Modules:
`draft_input_args` flattens them (each RMSNorm to its weight and eps), and the op rebuilds the norms
as `_RMSNorm`s that run the model's own RMSNorm code, so the op gives the module's results bit for bit.
The outputs are fresh tensors, never views of the inputs.

The ops do work on XLA tensors and record the same HLO as the inline reference (torch-xla 2.9 on PJRT
CPU; tests/test_kernel_ops.py checks it), but lazy tracing records whatever the implementation runs, so
an opaque op gains nothing there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neuron_peagle.kernels.cpu_linear import linear as cpu_linear
from neuron_peagle.kernels.first_layer_input import DraftInputParams, draft_input_reference
from neuron_peagle.kernels.lm_head import lm_head_argmax_reference
from neuron_peagle.models.layers import RMSNorm

__all__ = ["draft_input", "draft_input_args", "lm_head_argmax"]


# ---- LM head + greedy argmax ------------------------------------------------------------------


@torch.library.custom_op("neuron_peagle::lm_head_argmax", mutates_args=())
def lm_head_argmax(hidden: Tensor, weight: Tensor, d2t: Tensor | None) -> tuple[Tensor, Tensor]:
    # hidden [..., H] final-normed rows; weight [vocab, H] (nn.Linear's); d2t [vocab] int or None
    # -> token ids [...] int64 (mapped through d2t), their logits [...] float32
    return lm_head_argmax_reference(hidden, weight, d2t, cpu_linear)  # CPU: the decode-sized matmul


@lm_head_argmax.register_fake
def _lm_head_argmax_fake(hidden: Tensor, weight: Tensor, d2t: Tensor | None) -> tuple[Tensor, Tensor]:
    torch._check(hidden.shape[-1] == weight.shape[1], lambda: f"hidden {hidden.shape} @ weight {weight.shape}.T")
    lead = hidden.shape[:-1]
    return hidden.new_empty(lead, dtype=torch.int64), hidden.new_empty(lead, dtype=torch.float32)


# ---- drafter layer 0's input ------------------------------------------------------------------


class _RMSNorm(NamedTuple):
    """An RMSNorm as the op receives it, applied by the model's own `RMSNorm.forward`."""

    weight: Tensor  # [H]
    eps: float
    scale_in_float32: bool = False  # the drafter's norms: Llama's order
    __call__ = RMSNorm.forward


def draft_input_args(params: DraftInputParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float, float, bool]:
    """`params` as the op's arguments after (embeds, features, is_mask), in the op's order."""
    return (params.fc_weight, params.fc_mask_row, params.mask_embedding, params.input_layernorm.weight,
            params.hidden_norm.weight, float(params.input_layernorm.eps), float(params.hidden_norm.eps),
            bool(params.norm_before_residual))


def _params(fc_weight: Tensor, fc_mask_row: Tensor, mask_embedding: Tensor, input_norm_weight: Tensor,
            hidden_norm_weight: Tensor, input_eps: float, hidden_eps: float, norm_before_residual: bool
            ) -> DraftInputParams:
    return DraftInputParams(fc_weight, fc_mask_row, mask_embedding, _RMSNorm(input_norm_weight, input_eps),
                            _RMSNorm(hidden_norm_weight, hidden_eps), norm_before_residual)


@torch.library.custom_op("neuron_peagle::draft_input", mutates_args=())
def draft_input(embeds: Tensor, features: Tensor, is_mask: Tensor, fc_weight: Tensor, fc_mask_row: Tensor,
                mask_embedding: Tensor, input_norm_weight: Tensor, hidden_norm_weight: Tensor, input_eps: float,
                hidden_eps: float, norm_before_residual: bool) -> tuple[Tensor, Tensor]:
    # embeds [..., H] token embeddings; features [..., 3H_t]; is_mask [...] bool; fc_weight [3H_t, H];
    # fc_mask_row [H] = fc(mask_hidden); mask_embedding, input_norm_weight, hidden_norm_weight [H]
    # -> x [..., 2H] = [norm(embedding), norm(hidden)] (drafter layer 0's input), residual [..., H]
    return draft_input_reference(embeds, features, is_mask, _params(
        fc_weight, fc_mask_row, mask_embedding, input_norm_weight, hidden_norm_weight, input_eps, hidden_eps,
        norm_before_residual))


@draft_input.register_fake
def _draft_input_fake(embeds: Tensor, features: Tensor, is_mask: Tensor, fc_weight: Tensor, fc_mask_row: Tensor,
                      mask_embedding: Tensor, input_norm_weight: Tensor, hidden_norm_weight: Tensor,
                      input_eps: float, hidden_eps: float, norm_before_residual: bool) -> tuple[Tensor, Tensor]:
    torch._check(features.shape[-1] == fc_weight.shape[1], lambda: f"features {features.shape} @ fc {fc_weight.shape}.T")
    lead = torch.broadcast_shapes(embeds.shape[:-1], features.shape[:-1], is_mask.shape)
    hidden_size = fc_weight.shape[0]
    # The reference's type promotion: each norm returns weight * x (x in its input's dtype), and the
    # hidden is torch.where(mask, fc_mask_row, features @ fc_weight.T).
    hidden = torch.promote_types(fc_mask_row.dtype, features.dtype)
    normed_hidden = torch.promote_types(hidden_norm_weight.dtype, hidden)
    normed_embeds = torch.promote_types(input_norm_weight.dtype, embeds.dtype)
    x = embeds.new_empty((*lead, embeds.shape[-1] + hidden_size), dtype=torch.promote_types(normed_embeds,
                                                                                            normed_hidden))
    residual = embeds.new_empty((*lead, hidden_size), dtype=normed_hidden if norm_before_residual else hidden)
    return x, residual
