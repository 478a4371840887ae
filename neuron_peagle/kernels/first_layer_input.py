"""Kernel 1: the input of drafter layer 0 for every drafter slot, in one pass.

Per slot: the hidden h = fc(target features) (3H_t -> H), or at a P-EAGLE mask slot the precomputed
fc(mask_hidden); the token embedding, or at a mask slot the learned mask embedding; the two RMSNorms
(`input_layernorm` on the embedding, `hidden_norm` on h); their concatenation, the [slots, 2H] that
layer 0's attention reads; and the residual layer 0 adds back (normed or raw h, per
`norm_before_residual`). Unfused, the fc output, the substituted tensors and both normed tensors are
each written to HBM and read back; here they stay in SBUF, and HBM sees the fc weight once, the
inputs once and the two results once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from neuron_peagle.kernels.nki_api import nisa, nl
from neuron_peagle.kernels.tiles import (chunks, for_each_row_tile, for_each_tile, matmul_columns, rms_norm_rows,
                                         select_rows, transpose_into)


class DraftInputParams(NamedTuple):
    """The drafter weights the fused input reads."""

    fc_weight: Tensor  # [H, 3 * H_t] (nn.Linear's [out, in]; the kernel reads it transposed, see launch.py)
    fc_mask_row: Tensor  # [H], fc(mask_hidden): the hidden of every mask slot
    mask_embedding: Tensor  # [H]
    input_layernorm: nn.Module  # RMSNorm over the token embeddings
    hidden_norm: nn.Module  # RMSNorm over the hidden
    norm_before_residual: bool  # residual = normed hidden (True) or the hidden itself (False)


def draft_input_reference(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams
                          ) -> tuple[Tensor, Tensor]:
    # embeds [..., H] token embeddings; features [..., 3H_t]; is_mask [...] bool
    # -> x [..., 2H] = [norm(embedding), norm(hidden)], residual [..., H]
    mask = is_mask.unsqueeze(-1)
    embeds = torch.where(mask, params.mask_embedding.to(embeds.dtype), embeds)
    hidden = torch.where(mask, params.fc_mask_row, F.linear(features, params.fc_weight))
    normed_hidden = params.hidden_norm(hidden)
    residual = normed_hidden if params.norm_before_residual else hidden
    return torch.cat([params.input_layernorm(embeds), normed_hidden], dim=-1), residual


def draft_input_kernel(embeds, features, is_mask, fc_weight, fc_mask_row, mask_embedding, input_norm_weight,
                       hidden_norm_weight, input_eps, hidden_eps, norm_before_residual):
    # embeds [N, H]; features [N, F] (F = 3 H_t); is_mask [N, 1] float32, 1.0 at mask slots;
    # fc_weight [F, H]; fc_mask_row, mask_embedding, input_norm_weight, hidden_norm_weight: [1, H]
    # -> x [N, 2H], residual [N, H], both of embeds' dtype
    n, hidden = embeds.shape
    x = nl.ndarray((n, 2 * hidden), dtype=embeds.dtype, buffer=nl.shared_hbm)
    residual = nl.ndarray((n, hidden), dtype=embeds.dtype, buffer=nl.shared_hbm)
    inputs = (embeds, features, is_mask)
    weights = (fc_weight, fc_mask_row, mask_embedding, input_norm_weight, hidden_norm_weight)
    options = (input_eps, hidden_eps, norm_before_residual)
    for_each_row_tile(n, _slots, (x, residual, inputs, weights, options))
    return x, residual


def _slots(operands, index, start, rows: int) -> None:
    """Slots start .. start + rows (at most 128), one per partition."""
    x, residual, inputs, weights, options = operands
    embeds, features, is_mask = inputs
    fc_weight, fc_mask_row, mask_embedding, input_norm_weight, hidden_norm_weight = weights
    input_eps, hidden_eps, norm_before_residual = options
    hidden = embeds.shape[1]
    width = features.shape[1]
    pmax = nl.tile_size.pmax
    columns = nl.tile_size.gemm_moving_fmax

    mask = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=mask, src=is_mask[start:start + rows, 0:1])
    keep = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=keep, data=mask, op0=nl.multiply, operand0=-1.0, op1=nl.add, operand1=1.0)

    # h = features @ fc_weight, 512 output columns (one PSUM bank) at a time.
    feats = nl.ndarray((rows, width), dtype=features.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=feats, src=features[start:start + rows, 0:width])
    feats_t = nl.ndarray((pmax, chunks(width, pmax), rows), dtype=features.dtype, buffer=nl.sbuf)
    transpose_into(feats_t, feats, rows, width)
    h = nl.ndarray((rows, hidden), dtype=nl.float32, buffer=nl.sbuf)
    for_each_tile(hidden, columns, _fc_columns, (h, feats_t, fc_weight, rows))
    select_rows(h, h, fc_mask_row, mask, keep, rows, hidden)

    emb_in = nl.ndarray((rows, hidden), dtype=embeds.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=emb_in, src=embeds[start:start + rows, 0:hidden])
    emb = nl.ndarray((rows, hidden), dtype=nl.float32, buffer=nl.sbuf)
    select_rows(emb, emb_in, mask_embedding, mask, keep, rows, hidden)

    out = nl.ndarray((rows, 2 * hidden), dtype=embeds.dtype, buffer=nl.sbuf)
    rms_norm_rows(out[0:rows, 0:hidden], emb, input_norm_weight, rows, hidden, input_eps)
    rms_norm_rows(out[0:rows, hidden:2 * hidden], h, hidden_norm_weight, rows, hidden, hidden_eps)
    nisa.dma_copy(dst=x[start:start + rows, 0:2 * hidden], src=out)

    res = nl.ndarray((rows, hidden), dtype=embeds.dtype, buffer=nl.sbuf)
    if norm_before_residual:
        nisa.tensor_copy(dst=res, src=out[0:rows, hidden:2 * hidden])
    else:
        nisa.tensor_copy(dst=res, src=h)
    nisa.dma_copy(dst=residual[start:start + rows, 0:hidden], src=res)


def _fc_columns(operands, index, start, size: int) -> None:
    h, feats_t, fc_weight, rows = operands
    acc = nl.ndarray((rows, size), dtype=nl.float32, buffer=nl.psum)
    matmul_columns(acc, feats_t, fc_weight, rows, start, size)
    nisa.tensor_copy(dst=h[0:rows, start:start + size], src=acc)
