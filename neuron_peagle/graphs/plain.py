"""The plain-decoding graphs: prefill (one per prompt-length bucket) and single-token decode.

Each graph is a module whose forward takes and returns only fixed-shape tensors, in the order its
`Inputs` / `Outputs` tuples declare. The KV cache it holds is its state, updated in place (aliased
input-output buffers on a device). No `.item()`, no branches on tensor values, no variable shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.target import TargetModel


class PrefillInputs(NamedTuple):
    input_ids: Tensor  # [B, bucket] int64, right-padded
    lengths: Tensor  # [B] int64, real prompt lengths (>= 1)


class DecodeInputs(NamedTuple):
    tokens: Tensor  # [B] int64, the last committed token of each sequence
    positions: Tensor  # [B] int64, its position (its KV entry is written by this step)


class TokenOutputs(NamedTuple):
    next_tokens: Tensor  # [B] int64


class PrefillGraph(nn.Module):
    """Prompt bucket -> KV cache filled at positions 0..bucket-1, greedy token after each prompt."""

    Inputs = PrefillInputs
    Outputs = TokenOutputs

    def __init__(self, target: TargetModel, cache: KVCache) -> None:
        super().__init__()
        self.target = target
        self.cache = cache

    def forward(self, input_ids: Tensor, lengths: Tensor) -> TokenOutputs:
        batch, bucket = input_ids.shape
        positions = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        # Padding rows past a prompt's end write cache slots that decode overwrites before reading.
        out = self.target(input_ids, positions, self.cache, (lengths - 1).unsqueeze(-1))
        return TokenOutputs(out.logits[:, 0].argmax(-1))


class DecodeGraph(nn.Module):
    """One token per sequence -> its KV entry written, greedy next token."""

    Inputs = DecodeInputs
    Outputs = TokenOutputs

    def __init__(self, target: TargetModel, cache: KVCache) -> None:
        super().__init__()
        self.target = target
        self.cache = cache

    def forward(self, tokens: Tensor, positions: Tensor) -> TokenOutputs:
        zero = torch.zeros_like(tokens).unsqueeze(-1)
        out = self.target(tokens.unsqueeze(-1), positions.unsqueeze(-1), self.cache, zero)
        return TokenOutputs(out.logits[:, 0].argmax(-1))
