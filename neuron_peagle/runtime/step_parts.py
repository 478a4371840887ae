"""Timing the parts of a speculative step (draft, verify, accept) from the host, on eager only.

A compiled step graph is one call: its parts cannot be timed from inside without breaking the graph
(a timer is Python, not a tensor op). So the step graph runs its parts in one place,
`SpecStepGraph.run_parts`, which takes an optional part timer: `forward` (what a compiled backend
traces) passes none; on eager, where nothing is compiled, the runner calls `TimedStep`, which passes a
clock and a profiler range (`peagle::<part>`) around each part. Compiled backends report the step's
wall time only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from neuron_peagle.graphs.speculative import SpecStepGraph, SpecStepInputs, SpecStepOutputs

PARTS = ("draft", "verify", "accept")  # the part names SpecStepGraph.run_parts gives its timer


class TimedStep(nn.Module):
    """`graph`'s step, adding each part's seconds to `timings[part]`."""

    def __init__(self, graph: SpecStepGraph, timings: dict[str, float]) -> None:
        super().__init__()
        self.graph = graph
        self.timings = timings
        self.Inputs, self.Outputs = graph.Inputs, graph.Outputs
        self.target_cache = graph.target_cache  # what the eager backend narrows, as for the graph itself

    def cache_extent(self, inputs: SpecStepInputs) -> int:
        return self.graph.cache_extent(inputs)

    @contextmanager
    def _part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with torch.profiler.record_function(f"peagle::{name}"):
            yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def forward(self, temperature: Tensor, top_k: Tensor, top_p: Tensor, accept_uniform: Tensor,
                sample_uniform: Tensor) -> SpecStepOutputs:
        inputs = SpecStepInputs(temperature, top_k, top_p, accept_uniform, sample_uniform)
        return self.graph.run_parts(inputs, self._part)
