"""Speculative decoding on the prefill graphs and the fused step graph.

The host only prepares inputs (sampling settings, seeded uniforms) and reads back the committed
tokens; caches and the pending-feature state stay inside the graphs.

Adaptive K (`SpeculationConfig.short_draft_tokens`): a second step graph drafts only the short K. Each
graph call also returns how many of the next step's drafts context lookup already supplies; the
next step runs the long K where any live row has one, the short K elsewhere (a drafter's later drafts are
rarely accepted; copied spans often are, whole). Both graphs share the caches and a state sized for
the long K, so switching between them costs nothing and compiles nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neuron_peagle.backends import Backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.graphs.speculative import SpecPrefillGraph, SpecPrefillInputs, SpecStepGraph, SpecStepInputs
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.batch import BatchSampling, pad_prompts
from neuron_peagle.runtime.step_parts import TimedStep


class SpecRunner:
    def __init__(self, target: TargetModel, proposer: nn.Module, build: BuildConfig, backend: Backend,
                 num_speculative_tokens: int, short_draft_tokens: int = 0) -> None:
        self.build = build
        self.batch_size = build.batch_size
        self.backend = backend
        self.num_speculative_tokens = num_speculative_tokens
        self.tokens_per_step = num_speculative_tokens + 1
        # The K of each step graph, longest first (the short K only with adaptive K).
        self.step_ks = (num_speculative_tokens,) + ((short_draft_tokens,) if short_draft_tokens else ())
        feature_size = 3 * target.config.hidden_size
        self.target, self.proposer = target, proposer
        self.cache = target.new_cache(build.batch_size, step_tokens=num_speculative_tokens + 1)
        self.state = SpecState(build.batch_size, num_speculative_tokens, feature_size, target.embed_tokens.weight.dtype)
        self.graphs = {
            greedy: (SpecPrefillGraph(self.target, self.proposer, self.cache, self.state, greedy),
                     {k: SpecStepGraph(self.target, self.proposer, self.cache, self.state, k, greedy, build.kernels,
                                       build.lnc)
                      for k in self.step_ks})
            for greedy in (True, False)
        }
        backend.prepare([graph for prefill, steps in self.graphs.values() for graph in (prefill, *steps.values())])
        self.timings: dict[str, float] = {}
        # Where nothing is compiled, each step graph runs part by part, timed (runtime.step_parts); compiled
        # backends run it whole.
        self._timed = ({graph: TimedStep(graph, self.timings) for _, steps in self.graphs.values()
                        for graph in steps.values()} if backend.capabilities.times_step_parts else {})
        self._sampling: BatchSampling | None = None
        self._known_drafts = torch.zeros(build.batch_size, dtype=torch.int64)
        # Rows whose tokens still matter: only they choose the next step's K.
        self._live = torch.zeros(build.batch_size, dtype=torch.bool)

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: BatchSampling) -> Tensor:
        self._sampling = sampling
        self.timings.clear()
        ids, lengths = pad_prompts(prompts, self.batch_size, self.build.bucket_for(max(map(len, prompts))))
        s = sampling.tensors
        inputs = SpecPrefillInputs(ids, lengths, s.temperature, s.top_k, s.top_p, sampling.random.uniform(1))
        first, self._known_drafts = self.backend.run(self.graphs[sampling.greedy][0], inputs)
        self._live = torch.arange(self.batch_size) < len(prompts)  # not the padding rows of a short batch
        return first

    def retire(self, row: int) -> None:
        self._live[row] = False

    def next_k(self) -> int:
        """The K of the next step: the long one unless adaptive K finds no live row with a known draft."""
        if len(self.step_ks) == 1 or bool(((self._known_drafts > 0) & self._live).any()):
            return self.step_ks[0]
        return self.step_ks[1]

    def step(self) -> tuple[Tensor, Tensor]:
        sampling = self._sampling
        s = sampling.tensors
        k = self.next_k()
        uniforms = sampling.random.uniform(2 * k + 1)
        inputs = SpecStepInputs(s.temperature, s.top_k, s.top_p, uniforms[:, :k], uniforms[:, k:])
        graph = self.graphs[sampling.greedy][1][k]
        tokens, counts, self._known_drafts = self.backend.run(self._timed.get(graph, graph), inputs)
        return tokens, counts
