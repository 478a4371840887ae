"""Timing the parts of a speculative step (draft, verify, accept) from the host, on eager only.

A compiled step graph is one call: its parts cannot be timed from inside without breaking the graph
(a timer is Python, not a tensor op). So the graph exposes its parts as methods (`SpecStepGraph.draft`,
`.verify`, `.accept`) and runs them in `forward`; on eager, where nothing is compiled, the runner runs
them through `TimedStep` instead, which does the same calls in the same order with a clock and a
profiler range (`peagle::<part>`) around each. Compiled backends report the step's wall time only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from neuron_peagle.graphs.speculative import SpecStepGraph, SpecStepOutputs
from neuron_peagle.sampling import SamplingTensors

PARTS = ("draft", "verify", "accept")


class TimedStep(nn.Module):
    """`graph`'s forward, part by part, adding each part's seconds to `timings[part]`."""

    def __init__(self, graph: SpecStepGraph, timings: dict[str, float]) -> None:
        super().__init__()
        self.graph = graph
        self.timings = timings
        self.Inputs, self.Outputs = graph.Inputs, graph.Outputs
        self.cache = graph.cache
        self.cache_extent = graph.cache_extent

    @contextmanager
    def _part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with torch.profiler.record_function(f"peagle::{name}"):
            yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def forward(self, temperature: Tensor, top_k: Tensor, top_p: Tensor, accept_uniform: Tensor,
                sample_uniform: Tensor) -> SpecStepOutputs:
        with self._part("draft"):
            drafts = self.graph.draft()
        with self._part("verify"):
            verified = self.graph.verify(drafts)
        with self._part("accept"):
            return self.graph.accept(drafts, verified, SamplingTensors(temperature, top_k, top_p), accept_uniform,
                                     sample_uniform)
