"""Plain decoding (one token per step) on the fixed-shape prefill and decode graphs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from neuron_peagle.backends import Backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.plain import DecodeGraph, DecodeInputs, PrefillGraph, PrefillInputs
from neuron_peagle.models.target import TargetModel


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int, bucket: int) -> PrefillInputs:
    """Right-pad prompts to the bucket; missing rows of a short batch repeat the first prompt."""
    ids = torch.zeros(batch_size, bucket, dtype=torch.int64)
    lengths = torch.ones(batch_size, dtype=torch.int64)
    for i in range(batch_size):
        prompt = prompts[i] if i < len(prompts) else prompts[0]
        ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
        lengths[i] = len(prompt)
    return PrefillInputs(ids, lengths)


class PlainDecoder:
    def __init__(self, target: TargetModel, build: BuildConfig, backend: Backend) -> None:
        self.build = build
        self.batch_size = build.batch_size
        self.backend = backend
        cache = target.new_cache(build.batch_size)
        self.prefill_graph = backend.prepare(PrefillGraph(target, cache))
        self.decode_graph = backend.prepare(DecodeGraph(target, cache))
        self._tokens = torch.zeros(build.batch_size, dtype=torch.int64)
        self._positions = torch.zeros(build.batch_size, dtype=torch.int64)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        inputs = pad_prompts(prompts, self.batch_size, self.build.bucket_for(max(map(len, prompts))))
        (first,) = self.backend.run(self.prefill_graph, inputs)
        self._tokens = first.clone()
        self._positions = inputs.lengths.clone()
        return first

    def step(self, active: Tensor) -> tuple[Tensor, Tensor]:
        # Rows are independent, so an inactive row simply keeps decoding (its tokens are ignored);
        # its position is held below max_length so its cache writes stay in range.
        positions = self._positions.clamp(max=self.build.max_length - 1)
        (next_tokens,) = self.backend.run(self.decode_graph, DecodeInputs(self._tokens, positions))
        self._tokens = next_tokens
        self._positions = positions + 1
        return next_tokens.unsqueeze(-1), active.long()
