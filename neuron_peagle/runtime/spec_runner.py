"""Speculative decoding on the slots: a prefill graph per bucket admits one request into a slot, step
graphs (one per K) advance every slot at once.

The host only prepares inputs (sampling settings, seeded uniforms) and reads back the committed
tokens; caches and the pending-feature state stay inside the graphs.

K per step (runtime/k_choice.py): the engine keeps a step graph for each K it may run: the long K,
the short K (`SpeculationConfig.short_draft_tokens`) and K = 0 (`SpeculationConfig.plain_step`). All
share the caches and a state sized for the long K, so switching between them costs nothing and
compiles nothing; before each step the K that commits the most tokens per second for the occupied
slots is chosen, from step times measured on these graphs (`calibrate`) and the acceptance seen so far.
Each graph call also returns how many of the next step's drafts context lookup already supplies per
slot: copied spans are often accepted whole, which the choice counts on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from neuron_peagle.backends import Backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.interface import example_inputs
from neuron_peagle.graphs.proposers import Proposer
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.graphs.speculative import (PrefillState, SpecPrefillGraph, SpecPrefillInputs, SpecStepGraph,
                                              SpecStepInputs)
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.batch import SlotSampling
from neuron_peagle.runtime.k_choice import KChoice, KChooser
from neuron_peagle.runtime.step_parts import TimedStep

# Timed calls per step graph at calibration (after one untimed call); the median counts.
CALIBRATION_CALLS = 5


class SpecRunner:
    def __init__(self, target: TargetModel, make_proposer: Callable[[int], Proposer], build: BuildConfig,
                 backend: Backend, step_ks: Sequence[int],
                 agree: Callable[[list[float]], list[float]] = list) -> None:
        """make_proposer(rows): the proposer for a batch of `rows` (its state sized so); step_ks: the K of
        every step graph, the longest (the state's) first; agree: what every rank makes of its measured
        step times (under tensor parallelism every rank must choose the same K: parallel.agree_on_max)."""
        self._agree = agree
        self.build = build
        self.batch_size = build.batch_size
        self.backend = backend
        self.step_ks = tuple(step_ks)
        self.num_speculative_tokens = self.step_ks[0]
        self.tokens_per_step = self.num_speculative_tokens + 1
        self.target = target
        self.proposer = make_proposer(build.batch_size)
        self.cache = target.new_cache(build.batch_size, step_tokens=self.tokens_per_step)
        self.state = self._new_state(build.batch_size)
        prefill = None
        if build.batch_size > 1:  # a one-row twin of the state for the prefills (graphs/slots.py)
            prefill = PrefillState(target.new_cache(1, step_tokens=self.tokens_per_step), make_proposer(1),
                                   self._new_state(1))
        self.graphs = {
            greedy: (SpecPrefillGraph(target, self.proposer, self.cache, self.state, greedy, prefill),
                     {k: SpecStepGraph(target, self.proposer, self.cache, self.state, k, greedy, build.kernels,
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
        self.sampling = SlotSampling(build.batch_size)
        self.chooser = KChooser(self.step_ks)
        self.last_choice: KChoice | None = None
        self._known_drafts = torch.zeros(build.batch_size, dtype=torch.int64)
        self._live = [False] * build.batch_size  # slots holding a request

    def _new_state(self, rows: int) -> SpecState:
        return SpecState(rows, self.num_speculative_tokens, 3 * self.target.config.hidden_size,
                         self.target.embed_tokens.weight.dtype)

    def calibrate(self) -> None:
        """Time one step of every K on these graphs (before any request holds a slot: a step here
        changes the slots' state, which a prefill resets), once per engine; only where K is chosen."""
        if not self.chooser.chooses or self.chooser.step_seconds:
            return
        measured = []
        for k in self.step_ks:
            graph = self.graphs[True][1][k]
            inputs = example_inputs(graph, self.batch_size, None)
            seconds = []
            for _ in range(CALIBRATION_CALLS + 1):
                start = time.perf_counter()
                self.backend.run(graph, inputs)
                seconds.append(time.perf_counter() - start)
            measured.append(statistics.median(seconds[1:]))
        self.chooser.step_seconds.update(zip(self.step_ks, self._agree(measured)))

    def admit(self, slot: int, prompt: Sequence[int], params) -> int:
        """Prefill `prompt` into slot `slot` with its SamplingParams; returns its first new token."""
        inputs = SpecPrefillInputs(*self.sampling.admission(slot, prompt, params,
                                                            self.build.bucket_for(len(prompt))))
        first, known = self.backend.run(self.graphs[params.temperature == 0][0], inputs)
        self._known_drafts[slot] = known[0]
        self._live[slot] = True
        return int(first[0])

    def retire(self, slot: int) -> None:
        self._live[slot] = False

    def step(self) -> tuple[Tensor, Tensor]:
        live = [slot for slot, held in enumerate(self._live) if held]
        known = [int(self._known_drafts[slot]) for slot in live] if self.chooser.chooses else []
        choice = self.last_choice = self.chooser.choose(known) if self.chooser.chooses else None
        k = choice.k if choice is not None else self.num_speculative_tokens
        s = self.sampling.tensors
        uniforms = self.sampling.random.uniform(2 * k + 1)
        inputs = SpecStepInputs(s.temperature, s.top_k, s.top_p, uniforms[:, :k], uniforms[:, k:])
        graph = self.graphs[self.sampling.greedy(live)][1][k]
        tokens, counts, known_next = self.backend.run(self._timed.get(graph, graph), inputs)
        self._known_drafts = known_next.clone()  # a slot's entry is set at admission
        if choice is not None:
            self.chooser.observe(k, known, [int(counts[slot]) - 1 for slot in live])
        return tokens, counts
