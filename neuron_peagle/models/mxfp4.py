"""gpt-oss's MXFP4 experts, dequantized once at load (the graphs then run in the model's dtype).

The Hub's gpt-oss checkpoints store each expert matrix in the OCP microscaling format: for each output
row, blocks of 32 input values share one power-of-two scale. `{name}_blocks` [E, out, in/32, 16] uint8
packs two 4-bit E2M1 codes per byte (the low nibble is the even element), and `{name}_scales`
[E, out, in/32] uint8 holds each block's exponent, biased by 127. A value is FP4[code] * 2^(scale - 127).
Dequantized, a matrix is [E, in, out]: the layout of the dense `gate_up_proj` / `down_proj`. Each expert
dequantizes alone, so a rank reads and dequantizes only the experts it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuron_peagle.errors import WeightsError

BLOCK = 32  # values per scale
# The 16 E2M1 codes: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
QUANTIZED = ("gate_up_proj", "down_proj")  # the expert matrices gpt-oss quantizes; biases stay dense


def quantized_shapes(prefix: str, experts: int, rows: int, inputs: int) -> dict[str, tuple[int, ...]]:
    """The blocks and scales that stand for one [experts, inputs, rows] matrix named `prefix`."""
    return {prefix + "_blocks": (experts, rows, inputs // BLOCK, BLOCK // 2),
            prefix + "_scales": (experts, rows, inputs // BLOCK)}


def dequantize(blocks: Tensor, scales: Tensor, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    # blocks [E, out, G, 16] uint8; scales [E, out, G] uint8 -> [E, G * 32 (in), out] in `dtype`
    # (every value is computed in float32, then rounded to `dtype` once: what casting the float32 matrix does)
    for part, tensor in (("blocks", blocks), ("scales", scales)):
        if tensor.dtype != torch.uint8:
            raise WeightsError(f"{name}_{part} is {tensor.dtype}, MXFP4 stores uint8")
    table = torch.tensor(FP4_VALUES)
    experts, rows, groups, _ = blocks.shape
    dense = torch.empty(experts, groups * BLOCK, rows, dtype=dtype)
    for e in range(experts):  # one expert at a time: the int64 codes of a whole tensor would be 8x its size
        codes = torch.stack([blocks[e] & 0x0F, blocks[e] >> 4], dim=-1).flatten(-2).long()  # [out, G, 32]
        exponents = (scales[e].to(torch.int32) - 127).unsqueeze(-1)  # [out, G, 1]
        dense[e] = torch.ldexp(table[codes], exponents).flatten(-2).t()
    return dense
