"""Plain decoding (one token per step) on the fixed-shape prefill and decode graphs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from neuron_peagle.backends import Backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.plain import DecodeGraph, DecodeInputs, PrefillGraph, PrefillInputs
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.batch import BatchSampling, pad_prompts


class PlainRunner:
    tokens_per_step = 1

    def __init__(self, target: TargetModel, build: BuildConfig, backend: Backend) -> None:
        self.build = build
        self.batch_size = build.batch_size
        self.backend = backend
        self.target = target
        self.cache = target.new_cache(build.batch_size)
        self.graphs = {greedy: (PrefillGraph(self.target, self.cache, greedy), DecodeGraph(self.target, self.cache, greedy))
                       for greedy in (True, False)}
        backend.prepare([graph for graphs in self.graphs.values() for graph in graphs])
        self.timings: dict[str, float] = {}
        self._sampling: BatchSampling | None = None
        self._tokens = torch.zeros(build.batch_size, dtype=torch.int64)
        self._positions = torch.zeros(build.batch_size, dtype=torch.int64)

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: BatchSampling) -> Tensor:
        self._sampling = sampling
        self.timings = {}
        ids, lengths = pad_prompts(prompts, self.batch_size, self.build.bucket_for(max(map(len, prompts))))
        s = sampling.tensors
        inputs = PrefillInputs(ids, lengths, s.temperature, s.top_k, s.top_p, sampling.random.uniform(1))
        (first,) = self.backend.run(self.graphs[sampling.greedy][0], inputs)
        self._tokens = first.clone()
        self._positions = lengths.clone()
        return first

    def retire(self, row: int) -> None:
        pass  # rows are independent: a finished one keeps decoding, ignored

    def step(self) -> tuple[Tensor, Tensor]:
        # Rows are independent, so an inactive row simply keeps decoding (its tokens are ignored);
        # its position is held below max_length so its cache writes stay in range.
        sampling = self._sampling
        s = sampling.tensors
        positions = self._positions.clamp(max=self.build.max_length - 1)
        inputs = DecodeInputs(self._tokens, positions, s.temperature, s.top_k, s.top_p, sampling.random.uniform(1))
        (next_tokens,) = self.backend.run(self.graphs[sampling.greedy][1], inputs)
        self._tokens = next_tokens
        self._positions = positions + 1
        return next_tokens.unsqueeze(-1), torch.ones_like(next_tokens)
