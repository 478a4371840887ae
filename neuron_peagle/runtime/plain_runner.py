"""Plain decoding (one token per step) on the slots: a prefill graph per bucket admits one request into
a slot, the decode graph advances every slot by one token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from neuron_peagle.backends import Backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.plain import DecodeGraph, DecodeInputs, PrefillGraph, PrefillInputs
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.batch import SlotSampling


class PlainRunner:
    tokens_per_step = 1
    num_speculative_tokens = 0
    last_choice = None  # the K of every step is 0: nothing to choose

    def __init__(self, target: TargetModel, build: BuildConfig, backend: Backend) -> None:
        self.build = build
        self.batch_size = build.batch_size
        self.backend = backend
        self.target = target
        self.cache = target.new_cache(build.batch_size)
        # At B > 1 a prefill runs on a one-row cache, then enters its slot (graphs/slots.py).
        prefill_cache = target.new_cache(1) if build.batch_size > 1 else None
        self.graphs = {greedy: (PrefillGraph(self.target, self.cache, greedy, prefill_cache),
                                DecodeGraph(self.target, self.cache, greedy))
                       for greedy in (True, False)}
        backend.prepare([graph for graphs in self.graphs.values() for graph in graphs])
        self.timings: dict[str, float] = {}
        self.sampling = SlotSampling(build.batch_size)
        self._tokens = torch.zeros(build.batch_size, dtype=torch.int64)
        self._positions = torch.zeros(build.batch_size, dtype=torch.int64)
        self._live = [False] * build.batch_size

    def calibrate(self) -> None:
        pass  # one step graph: nothing to choose between

    def admit(self, slot: int, prompt: Sequence[int], params) -> int:
        """Prefill `prompt` into slot `slot` with its SamplingParams; returns its first new token."""
        inputs = PrefillInputs(*self.sampling.admission(slot, prompt, params, self.build.bucket_for(len(prompt))))
        (first,) = self.backend.run(self.graphs[params.temperature == 0][0], inputs)
        self._tokens[slot] = first[0]
        self._positions[slot] = len(prompt)
        self._live[slot] = True
        return int(first[0])

    def retire(self, slot: int) -> None:
        self._live[slot] = False

    def step(self) -> tuple[Tensor, Tensor]:
        # Slots are independent, so a free slot simply keeps decoding (its tokens are ignored); its
        # position is held below max_length so its cache writes stay in range.
        s = self.sampling.tensors
        positions = self._positions.clamp(max=self.build.max_length - 1)
        inputs = DecodeInputs(self._tokens, positions, s.temperature, s.top_k, s.top_p,
                              self.sampling.random.uniform(1))
        live = [slot for slot, held in enumerate(self._live) if held]
        (next_tokens,) = self.backend.run(self.graphs[self.sampling.greedy(live)][1], inputs)
        self._tokens = next_tokens.clone()
        self._positions = positions + 1
        return next_tokens.unsqueeze(-1), torch.ones_like(next_tokens)
