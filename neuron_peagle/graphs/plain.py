"""The plain-decoding graphs: prefill of one sequence into its slot (one per prompt-length bucket,
graphs/slots.py) and single-token decode of every slot.

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

from neuron_peagle.graphs.slots import SlotEntry
from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.target import TargetModel
from neuron_peagle.sampling import SamplingTensors, next_tokens


class PrefillInputs(NamedTuple):
    input_ids: Tensor  # [1, bucket] int64, right-padded
    lengths: Tensor  # [1] int64, the real prompt length (>= 1)
    slot: Tensor  # [1] int64, the batch row the sequence takes
    temperature: Tensor  # [1] float32 (0 = greedy)
    top_k: Tensor  # [1] int64
    top_p: Tensor  # [1] float32
    sample_uniform: Tensor  # [1, 1] float32


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
    """One prompt bucket -> its KV entries at positions 0..bucket-1 of slot `slot`, the token after it.

    `prefill_cache`: the one-row cache the prefill runs on (graphs/slots.py); default, and at batch 1,
    the batch's own `cache`."""

    Inputs = PrefillInputs
    Outputs = TokenOutputs

    def __init__(self, target: TargetModel, cache: KVCache, greedy: bool, prefill_cache: KVCache | None = None) -> None:
        super().__init__()
        self.target, self.cache, self.greedy = target, cache, greedy
        self.prefill_cache = prefill_cache if prefill_cache is not None else cache
        self.entry = SlotEntry(self.cache, self.prefill_cache)

    def forward(self, input_ids: Tensor, lengths: Tensor, slot: Tensor, temperature: Tensor, top_k: Tensor,
                top_p: Tensor, sample_uniform: Tensor) -> TokenOutputs:
        batch, bucket = input_ids.shape
        positions = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        # Padding rows past a prompt's end write cache slots that decode overwrites before reading.
        out = self.target(input_ids, positions, self.prefill_cache, (lengths - 1).unsqueeze(-1),
                          valid_lengths=lengths)
        self.entry.enter(slot, bucket)
        return TokenOutputs(next_tokens(out.logits, self.greedy, SamplingTensors(temperature, top_k, top_p),
                                        sample_uniform))

    rows_per_step = None  # not a per-step graph

    @property
    def target_cache(self) -> KVCache:
        """The cache the target's pass reads (the one a backend may narrow)."""
        return self.prefill_cache

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

    @property
    def target_cache(self) -> KVCache:
        return self.cache

    def cache_extent(self, inputs: DecodeInputs) -> int:
        """The last cache slot this call reads (host side, for a backend that narrows its reads)."""
        return int(inputs.positions.max())
