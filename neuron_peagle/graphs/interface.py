"""The graphs of an engine, declared once for the runners, every backend and the build.

A graph is a module whose class declares its interface:
- `Inputs` / `Outputs`: NamedTuples of fixed-shape tensors, in call order (the runners build their
  inputs with `Inputs`, every backend returns `Outputs`);
- its state: the buffers of the `StateModule`s it reaches (KV caches, speculative state, lookup
  history), which stay on the device between calls and which it updates only through their own write
  methods (neuron_peagle.state_writes: in place, or rebound to out-of-place results for the nxd backend).
`example_inputs` gives inputs of the exact shapes and dtypes the runners feed, for given build
shapes (values do not matter to a fixed-shape graph), and `plan` lists every graph a runner runs
with its planned name. Compiled backends warm graphs from this list (`Engine.warm`), the artifact
build compiles it (`Backend.build_artifacts`), the NxD bundle keys on its names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.plain import DecodeGraph, DecodeInputs, PrefillGraph
from neuron_peagle.graphs.speculative import SpecPrefillGraph, SpecStepGraph, SpecStepInputs
from neuron_peagle.state_writes import StateModule

GRAPH_KINDS: dict[type, str] = {
    PrefillGraph: "prefill",
    DecodeGraph: "decode",
    SpecPrefillGraph: "spec_prefill",
    SpecStepGraph: "spec_step",
}
PREFILL_KINDS = ("prefill", "spec_prefill")


class GraphRunner(Protocol):
    """What `plan` needs of a runner: its build and `graphs[greedy] = (prefill, step or {K: step})`."""

    build: BuildConfig
    graphs: dict


@dataclass(frozen=True)
class PlannedGraph:
    """One fixed-shape graph an engine runs."""

    name: str  # unique per engine, e.g. "spec_prefill_b128_greedy"; artifact files and NxD keys use it
    kind: str  # one of GRAPH_KINDS' values
    bucket: int | None  # prompt-length bucket of a prefill graph; None for the per-step graphs
    greedy: bool
    module: nn.Module
    example_inputs: NamedTuple  # the graph's `Inputs`, host tensors
    state_names: tuple[str, ...]  # buffers (dotted names in `module`) the graph updates: its state

    @property
    def state_buffers(self) -> dict[str, Tensor]:
        """name -> the state tensor as the module holds it now (moving a module replaces them)."""
        return {name: self.module.get_buffer(name) for name in self.state_names}


def state_names(module: nn.Module) -> tuple[str, ...]:
    """Dotted names of every state buffer (KV caches, speculative state, lookup history: the buffers of
    the `StateModule`s) reachable from `module`; on a device these are aliased input -> output."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, StateModule):
            names.extend(f"{prefix}.{name}" for name, _ in sub.named_buffers(recurse=False))
    return tuple(names)


def target_caches(graphs: Sequence[nn.Module]) -> list[nn.Module]:
    """The target's KV caches the graphs hold (the batch's, and a prefill's one-row twin), once each."""
    caches: dict[int, nn.Module] = {}
    for graph in graphs:
        for cache in (graph.cache, getattr(graph, "prefill_cache", graph.cache)):
            caches.setdefault(id(cache), cache)
    return list(caches.values())


def example_inputs(graph: nn.Module, batch_size: int, bucket: int | None) -> NamedTuple:
    """Host inputs of the shapes and dtypes the runners feed `graph` (bucket: prefill graphs only)."""
    b = batch_size
    temperature = torch.zeros(b) if graph.greedy else torch.ones(b)  # [B] float32
    top_k, top_p = torch.zeros(b, dtype=torch.int64), torch.ones(b)  # [B] int64, [B] float32
    kind = GRAPH_KINDS[type(graph)]
    if kind in PREFILL_KINDS:  # one sequence, into a slot
        ids = torch.zeros(1, bucket, dtype=torch.int64)  # [1, bucket]
        one = torch.ones(1, dtype=torch.int64)  # [1] length
        return graph.Inputs(ids, one, one * (b - 1), temperature[:1], top_k[:1], top_p[:1], torch.rand(1, 1))
    if kind == "decode":
        zeros = torch.zeros(b, dtype=torch.int64)  # [B] tokens and positions
        return DecodeInputs(zeros, zeros.clone(), temperature, top_k, top_p, torch.rand(b, 1))
    k = graph.num_speculative_tokens
    # [B, K] acceptance tests, [B, K+1] samples
    return SpecStepInputs(temperature, top_k, top_p, torch.rand(b, k), torch.rand(b, k + 1))


def plan(runner: GraphRunner) -> list[PlannedGraph]:
    """Every graph `runner` runs: its prefill graph per bucket and its step graph(s), greedy and sampling.

    Both variants are planned because a batch picks one at run time (all rows greedy or not). A
    speculative runner keeps `{K: step graph}` for every K it may choose: the longest one is
    "spec_step_<variant>", the others "spec_step_k<K>_<variant>" (K=0: "spec_step_k0_<variant>").
    """
    build = runner.build
    planned = []
    for greedy in (True, False):
        variant = "greedy" if greedy else "sampling"
        prefill, steps = runner.graphs[greedy]
        steps = steps if isinstance(steps, dict) else {None: steps}
        graphs = [(prefill, build.prefill_buckets, "")]
        graphs += [(step, (None,), f"k{k}_" if i else "") for i, (k, step) in enumerate(steps.items())]
        for graph, buckets, k_tag in graphs:
            kind = GRAPH_KINDS[type(graph)]
            for bucket in buckets:
                name = f"{kind}_b{bucket}_{variant}" if bucket is not None else f"{kind}_{k_tag}{variant}"
                planned.append(PlannedGraph(name, kind, bucket, greedy, graph,
                                            example_inputs(graph, build.batch_size, bucket), state_names(graph)))
    return planned
