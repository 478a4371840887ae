"""The plain-decoding graphs: prefill (one per prompt-length bucket) and single-token decode.

Each graph is a module whose forward takes and returns only fixed-shape tensors, in the order its
`Inputs` / `Outputs` tuples declare. The KV cache it holds is its state, written through the cache's
own methods (neuron_peagle.state_writes; aliased input-output buffers on a device). No `.item()`, no
branches on tensor values, no variable shapes.
A graph is greedy or sampling by construction (`greedy=True` ignores the sampling inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.target import TargetModel
from neuron_peagle.sampling import SamplingTensors, next_tokens


class PrefillInputs(NamedTuple):
    input_ids: Tensor  # [B, bucket] int64, right-padded
    lengths: Tensor  # [B] int64, real prompt lengths (>= 1)
    temperature: Tensor  # [B] float32 (0 = greedy)
    top_k: Tensor  # [B] int64
    top_p: Tensor  # [B] float32
    sample_uniform: Tensor  # [B, 1] float32


class DecodeInputs(NamedTuple):
    tokens: Tensor  # [B] int64, the last committed token of each sequence
    positions: Tensor  # [B] int64, its position (its KV entry is written by this step)
    temperature: Tensor  # [B] float32
    top_k: Tensor  # [B] int64
    top_p: Tensor  # [B] float32
    sample_uniform: Tensor  # [B, 1] float32


class TokenOutputs(NamedTuple):
    next_tokens: Tensor  # [B] int64


class PrefillGraph(nn.Module):
    """Prompt bucket -> KV cache filled at positions 0..bucket-1, the token after each prompt."""

    Inputs = PrefillInputs
    Outputs = TokenOutputs

    def __init__(self, target: TargetModel, cache: KVCache, greedy: bool) -> None:
        super().__init__()
        self.target, self.cache, self.greedy = target, cache, greedy

    def forward(self, input_ids: Tensor, lengths: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                sample_uniform: Tensor) -> TokenOutputs:
        batch, bucket = input_ids.shape
        positions = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        # Padding rows past a prompt's end write cache slots that decode overwrites before reading.
        out = self.target(input_ids, positions, self.cache, (lengths - 1).unsqueeze(-1), valid_lengths=lengths)
        return TokenOutputs(next_tokens(out.logits, self.greedy, SamplingTensors(temperature, top_k, top_p),
                                        sample_uniform))

    rows_per_step = None  # not a per-step graph

    def cache_extent(self, inputs: PrefillInputs) -> int:
        """The last cache slot this call reads (host side, for a backend that narrows its reads)."""
        return inputs.input_ids.shape[1] - 1


class DecodeGraph(nn.Module):
    """One token per sequence -> its KV entry written, the next token."""

    Inputs = DecodeInputs
    Outputs = TokenOutputs

    def __init__(self, target: TargetModel, cache: KVCache, greedy: bool) -> None:
        super().__init__()
        self.target, self.cache, self.greedy = target, cache, greedy

    def forward(self, tokens: Tensor, positions: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                sample_uniform: Tensor) -> TokenOutputs:
        zero = torch.zeros_like(tokens).unsqueeze(-1)
        out = self.target(tokens.unsqueeze(-1), positions.unsqueeze(-1), self.cache, zero)
        return TokenOutputs(next_tokens(out.logits, self.greedy, SamplingTensors(temperature, top_k, top_p),
                                        sample_uniform))

    @property
    def rows_per_step(self) -> int:
        """Rows a decode-time matmul multiplies: one token per sequence."""
        return self.cache.shape[0]

    def cache_extent(self, inputs: DecodeInputs) -> int:
        """The last cache slot this call reads (host side, for a backend that narrows its reads)."""
        return int(inputs.positions.max())
