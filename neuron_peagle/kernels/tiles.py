"""Tile-level helpers shared by the kernels (NKI code: called from inside @nki.jit kernels).

Layout used throughout: a few activation rows (drafter slots, verify rows; at most 128 per tile) sit
on the partitions with the hidden dimension along the free axis, so per-row reductions (RMSNorm,
argmax) are free-axis reductions. For a matmul the contraction must lie on the partitions instead,
so activation rows are transposed once into [128, chunks, rows] and stay the *stationary* operand,
while weight tiles [128, <=512] stream through the Tensor Engine as the *moving* operand: each
weight element crosses HBM exactly once, which is what bounds these decode-time matmuls.

Every loop covers full tiles and then the remainder tile, so any size works, not only multiples
of 128 or 512. Loops are plain `range` loops (NKI's `affine_range` / `sequential_range` are deprecated
aliases of it) and every function handed to another is a named one: the NKI front end compiles a
Python subset that documents named functions only, no lambdas.
"""

from __future__ import annotations

from neuron_peagle.kernels.nki_api import nisa, nl


def chunks(size: int, chunk: int) -> int:
    return (size + chunk - 1) // chunk


def for_each_tile(size: int, tile: int, body, operands) -> None:
    """body(operands, index, start, length) for the full tiles of `size`, in order, then once for the
    remainder tile if there is one. `body` is a named function; `operands` is the tuple it unpacks."""
    full, rest = size // tile, size % tile
    for i in range(full):
        body(operands, i, i * tile, tile)
    if rest:
        body(operands, full, full * tile, rest)


def for_each_row_tile(size: int, body, operands) -> None:
    """`for_each_tile` over `size` rows in tiles of 128 partitions, this physical core's tiles only: tile i
    runs on core i % cores. A kernel launched at LNC=2 so splits its rows between the two cores of the
    logical core (each writes its own rows of the shared outputs); at LNC=1 one core takes them all. At
    decode sizes (one tile) the second core has nothing to do."""
    for_each_tile(size, nl.tile_size.pmax, _on_this_core, (body, operands))


def _on_this_core(task, index, start, length: int) -> None:
    body, operands = task
    if index % nl.num_programs(0) == nl.program_id(0):
        body(operands, index, start, length)


def transpose_into(dst, src, rows: int, width: int) -> None:
    """dst[0:kc, k, 0:rows] = src[0:rows, k*128 : k*128 + kc].T for every 128-wide chunk k.

    src: [rows, width] SBUF; dst: [128, chunks(width, 128), rows] SBUF, same dtype."""
    for_each_tile(width, nl.tile_size.pmax, _transpose_chunk, (dst, src, rows))


def _transpose_chunk(operands, k, start, size: int) -> None:
    dst, src, rows = operands
    chunk = nl.ndarray((size, rows), dtype=src.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=chunk, data=src[0:rows, start:start + size])
    nisa.tensor_copy(dst=dst[0:size, k, 0:rows], src=chunk)


def matmul_columns(acc, lhs_t, weight, rows: int, start, size: int) -> None:
    """acc = lhs @ weight[:, start:start + size], the contraction tiled by 128 and summed in PSUM.

    acc: [rows, size <= 512] float32 PSUM; lhs_t: lhs transposed by `transpose_into`;
    weight: [K, N] in HBM ([in, out]: a Linear weight transposed, see launch.py)."""
    for_each_tile(weight.shape[0], nl.tile_size.pmax, _accumulate, (acc, lhs_t, weight, rows, start, size))


def _accumulate(operands, k, k_start, k_size: int) -> None:
    acc, lhs_t, weight, rows, start, size = operands
    w = nl.ndarray((k_size, size), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=weight[k_start:k_start + k_size, start:start + size])
    # The first matmul into a PSUM element overwrites it, the later ones accumulate.
    nisa.nc_matmul(dst=acc, stationary=lhs_t[0:k_size, k, 0:rows], moving=w)


def broadcast_row(dst, row, rows: int, width: int) -> None:
    """dst[p, :] = row[0, :] for every partition p < rows (a stride-0 DMA). row: [1, width] HBM."""
    nisa.dma_copy(dst=dst, src=row.ap(pattern=[[0, rows], [1, width]], offset=0))


def select_rows(dst, src, row, mask, keep, rows: int, width: int) -> None:
    """dst = src where mask == 0, row where mask == 1 (mask, keep = 1 - mask: [rows, 1] float32).

    Computed as src * keep + row * mask, which is exact for 0/1 weights and finite values."""
    kept = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=kept, data=src, op0=nl.multiply, operand0=keep)
    other = nl.ndarray((rows, width), dtype=row.dtype, buffer=nl.sbuf)
    broadcast_row(other, row, rows, width)
    nisa.scalar_tensor_tensor(dst=dst, data=other, op0=nl.multiply, operand0=mask, op1=nl.add, operand1=kept)


def rms_norm_rows(dst, src, weight, rows: int, width: int, eps: float) -> None:
    """dst = weight * src * rsqrt(mean(src^2) + eps) along the free axis, statistics in float32.

    src: [rows, width] float32 SBUF; weight: [1, width] HBM; dst: [rows, width] SBUF, any dtype."""
    work = nl.ndarray((rows, width), dtype=nl.float32, buffer=nl.sbuf)
    total = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation_reduce(dst=work, op=nl.square, data=src, reduce_op=nl.add, reduce_res=total)
    eps_column = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_column, value=eps)
    inv_rms = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=inv_rms, op=nl.rsqrt, data=total, scale=1.0 / width, bias=eps_column)
    nisa.tensor_scalar(dst=work, data=src, op0=nl.multiply, operand0=inv_rms)
    gamma = nl.ndarray((rows, width), dtype=weight.dtype, buffer=nl.sbuf)
    broadcast_row(gamma, weight, rows, width)
    nisa.tensor_tensor(dst=dst, data1=work, data2=gamma, op=nl.multiply)
