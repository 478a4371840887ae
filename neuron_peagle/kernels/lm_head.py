"""Kernel 2: LM head + greedy argmax, without ever writing the [rows, vocab] logits to HBM.

For each row (a drafter slot that proposes a token, or a verify position of the target), the
logits are computed 512 vocabulary columns at a time into one PSUM bank, reduced there to the tile's
maximum and the lowest column reaching it, and merged into a running (maximum, index) pair; only
the token id and its logit per row leave the chip. With a reduced draft vocabulary the draft id is
mapped to the target's (`target_id = draft_id + d2t[draft_id]`) by a gather inside the kernel.

Ties resolve to the lowest index, as `torch.argmax` does: inside a tile the minimum column among
the maxima wins, and a later tile replaces the running pair only when strictly greater.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.nn import functional as F

from neuron_peagle.kernels.nki_api import nisa, nl
from neuron_peagle.kernels.tiles import chunks, for_each_row_tile, for_each_tile, matmul_columns, transpose_into

FLOAT32_LOWEST = -3.4028234663852886e38  # the running maximum starts below every finite logit
# Pushes columns that are not at the maximum past every index; indices stay exact in float32 below it.
NOT_AT_MAXIMUM = float(2**24)
MAX_VOCAB = 2**24


def lm_head_argmax_reference(hidden: Tensor, weight: Tensor, d2t: Tensor | None = None,
                             linear: Callable[[Tensor, Tensor], Tensor] = F.linear) -> tuple[Tensor, Tensor]:
    # hidden [..., H] final-normed rows; weight [vocab, H] (nn.Linear's); d2t [vocab] int64 or None
    # -> token ids [...] int64 (target vocabulary), their logits [...] float32
    logits = linear(hidden, weight).float()
    ids = logits.argmax(-1)
    best = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (ids if d2t is None else ids + d2t[ids]), best


def lm_head_argmax_kernel(hidden, weight):
    # hidden [R, H]; weight [H, V] -> ids [R, 1] int32, logits [R, 1] float32
    ids, best = _outputs(hidden)
    for_each_row_tile(hidden.shape[0], _store_rows, (ids, best, hidden, weight))
    return ids, best


def lm_head_argmax_d2t_kernel(hidden, weight, d2t):
    # hidden [R, H]; weight [H, V_draft]; d2t [V_draft, 1] int32 -> target ids [R, 1] int32, logits [R, 1] float32
    ids, best = _outputs(hidden)
    for_each_row_tile(hidden.shape[0], _store_mapped_rows, (ids, best, hidden, weight, d2t))
    return ids, best


def _outputs(hidden):
    rows = hidden.shape[0]
    ids = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    best = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    return ids, best


def _store_rows(operands, index, start, rows: int) -> None:
    ids, best, hidden, weight = operands
    row_ids, row_best = _argmax_rows(hidden, weight, start, rows)
    nisa.dma_copy(dst=ids[start:start + rows, 0:1], src=row_ids)
    nisa.dma_copy(dst=best[start:start + rows, 0:1], src=row_best)


def _store_mapped_rows(operands, index, start, rows: int) -> None:
    ids, best, hidden, weight, d2t = operands
    row_ids, row_best = _argmax_rows(hidden, weight, start, rows)
    offset = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=offset, src=d2t.ap(pattern=[[1, rows], [1, 1]], offset=0, vector_offset=row_ids,
                                         indirect_dim=0))
    nisa.tensor_tensor(dst=row_ids, data1=row_ids, data2=offset, op=nl.add)
    nisa.dma_copy(dst=ids[start:start + rows, 0:1], src=row_ids)
    nisa.dma_copy(dst=best[start:start + rows, 0:1], src=row_best)


def _argmax_rows(hidden, weight, start, rows: int):
    """Rows start .. start + rows (at most 128) -> ids [rows, 1] int32, best logits [rows, 1] float32 (SBUF)."""
    width, vocab = weight.shape
    pmax = nl.tile_size.pmax
    columns = nl.tile_size.gemm_moving_fmax

    h = nl.ndarray((rows, width), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=h, src=hidden[start:start + rows, 0:width])
    h_t = nl.ndarray((pmax, chunks(width, pmax), rows), dtype=hidden.dtype, buffer=nl.sbuf)
    transpose_into(h_t, h, rows, width)

    best = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=best, value=FLOAT32_LOWEST)
    best_index = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=best_index, value=0.0)
    tile_start = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)  # first vocab id of the tile
    nisa.memset(dst=tile_start, value=0.0)
    column = nl.ndarray((rows, columns), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=column, pattern=[[1, columns]], offset=0, channel_multiplier=0)

    # The running maximum is carried from tile to tile: a plain range loop keeps the order (NKI compiles
    # `range` as a sequential loop).
    for_each_tile(vocab, columns, _vocab_tile, (weight, (h_t, column, tile_start, best, best_index), rows))

    ids = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=ids, src=best_index)
    return ids, best


def _vocab_tile(operands, index, start, size: int) -> None:
    weight, state, rows = operands
    h_t, column, tile_start, best, best_index = state
    logits = nl.ndarray((rows, size), dtype=nl.float32, buffer=nl.psum)
    matmul_columns(logits, h_t, weight, rows, start, size)

    tile_max = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=tile_max, op=nl.maximum, data=logits, axis=1)
    # The lowest column at the maximum: every other column is pushed past all indices, then min.
    candidate = nl.ndarray((rows, size), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=candidate, data=logits, op0=nl.not_equal, operand0=tile_max,
                       op1=nl.multiply, operand1=NOT_AT_MAXIMUM)
    nisa.tensor_tensor(dst=candidate, data1=candidate, data2=column[0:rows, 0:size], op=nl.add)
    tile_index = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=tile_index, op=nl.minimum, data=candidate, axis=1)
    nisa.tensor_tensor(dst=tile_index, data1=tile_index, data2=tile_start, op=nl.add)

    # Strictly greater replaces: on a tie with an earlier tile the earlier (lower) index stays.
    better = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=better, data1=tile_max, data2=best, op=nl.greater)
    nisa.tensor_tensor(dst=tile_index, data1=tile_index, data2=best_index, op=nl.subtract)
    nisa.scalar_tensor_tensor(dst=best_index, data=tile_index, op0=nl.multiply, operand0=better,
                              op1=nl.add, operand1=best_index)
    nisa.tensor_tensor(dst=best, data1=best, data2=tile_max, op=nl.maximum)
    nisa.tensor_scalar(dst=tile_start, data=tile_start, op0=nl.add, operand0=size * 1.0)
