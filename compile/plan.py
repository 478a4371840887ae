"""Which graphs an engine needs, and everything about each that does not depend on the compiler.

Both artifact backends start from the same list of `GraphSpec`s: the xla build hands each one to
torch-xla (and its persistent compilation cache), the neuron build makes each one a key of one
neuronx-distributed NxDModel (its name is the key; backends/neuron_graphs.py). So the graph
selection, the example inputs, the map of aliased state and the neuronx-cc arguments are decided
here once, and the xla tests cover all of it before the neuron path reaches the SDK. Loading plans
again with the same code, so the loaded engine names and calls exactly the graphs that were built.

The example inputs are built the way the decoders build their inputs (`pad_prompts`,
`BatchSampling`), with the same shapes and dtypes; values do not matter to a fixed-shape graph.
Warming a loaded engine with them must leave generation nothing to compile, which the tests check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuron_peagle.backends.xla import XlaBackend, hlo_text
from neuron_peagle.config import BuildConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.graphs.plain import DecodeGraph, DecodeInputs, PrefillGraph
from neuron_peagle.graphs.lookup import LookupProposer
from neuron_peagle.graphs.proposers import SpecState
from neuron_peagle.graphs.speculative import SpecPrefillGraph, SpecStepGraph, SpecStepInputs
from neuron_peagle.kv_cache import KVCache
from neuron_peagle.runtime.batch import BatchSampling, pad_prompts
from neuron_peagle.runtime.engine import SamplingParams
from neuron_peagle.runtime.plain_decoder import PlainDecoder
from neuron_peagle.runtime.spec_decoder import SpecDecoder

# The flags NxD uses for transformer graphs (see docs): no implicit down-casting, inf saturation.
NEURON_COMPILER_FLAGS = ("--enable-saturate-infinity", "--auto-cast=none", "--model-type=transformer", "-O1")
TARGETS = ("trn1", "trn2")

# Modules whose buffers a graph updates in place: on a device these are aliased input -> output.
STATE_MODULES = (KVCache, SpecState, LookupProposer)

GRAPH_KINDS: dict[type, str] = {
    PrefillGraph: "prefill",
    DecodeGraph: "decode",
    SpecPrefillGraph: "spec_prefill",
    SpecStepGraph: "spec_step",
}
PREFILL_KINDS = ("prefill", "spec_prefill")


def neuron_compiler_args(target: str) -> tuple[str, ...]:
    """neuronx-cc arguments for every graph of a build for `target` (trn1 or trn2)."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    return (*NEURON_COMPILER_FLAGS, "--target", target)


@dataclass(frozen=True)
class GraphSpec:
    """One fixed-shape graph to compile: the module, example inputs, and its aliased state."""

    name: str  # unique in a build, e.g. "spec_prefill_b128_greedy"; names the artifact files
    kind: str  # "prefill" | "decode" | "spec_prefill" | "spec_step"
    bucket: int | None  # prompt-length bucket of a prefill graph; None for the per-step graphs
    greedy: bool
    module: nn.Module
    example_inputs: tuple[Tensor, ...]  # the graph's `Inputs` NamedTuple, host tensors
    state_names: tuple[str, ...]  # buffers (dotted names in `module`) the graph updates in place
    compiler_args: tuple[str, ...]

    @property
    def state_buffers(self) -> dict[str, Tensor]:
        """name -> the state tensor as the module holds it now (moving a module replaces them)."""
        return {name: self.module.get_buffer(name) for name in self.state_names}


def state_names(module: nn.Module) -> tuple[str, ...]:
    """Dotted names of every KV-cache and speculative-state buffer reachable from `module`."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, STATE_MODULES):
            names.extend(f"{prefix}.{name}" for name, _ in sub.named_buffers(recurse=False))
    return tuple(names)


def example_inputs(graph: nn.Module, build: BuildConfig, bucket: int | None) -> tuple[Tensor, ...]:
    """Host inputs of the shapes and dtypes the decoders feed `graph` (bucket: prefill graphs only)."""
    batch = build.batch_size
    params = SamplingParams(temperature=0.0 if graph.greedy else 1.0, seed=0)
    sampling = BatchSampling.from_params([params], batch)
    s = sampling.tensors
    kind = GRAPH_KINDS[type(graph)]
    if kind in PREFILL_KINDS:
        ids, lengths = pad_prompts([[0] * bucket], batch, bucket)  # [B, bucket], [B]
        return graph.Inputs(ids, lengths, s.temperature, s.top_k, s.top_p, sampling.random.uniform(1))
    if kind == "decode":
        zeros = torch.zeros(batch, dtype=torch.int64)  # [B] tokens and positions
        return DecodeInputs(zeros, zeros.clone(), s.temperature, s.top_k, s.top_p, sampling.random.uniform(1))
    k = graph.num_draft_tokens
    uniforms = sampling.random.uniform(2 * k + 1)  # [B, 2K+1]: acceptance tests, then samples
    return SpecStepInputs(s.temperature, s.top_k, s.top_p, uniforms[:, :k], uniforms[:, k:])


def plan_graphs(decoder: PlainDecoder | SpecDecoder, compiler_args: tuple[str, ...]) -> list[GraphSpec]:
    """Every graph `decoder` runs: its prefill graph per bucket and its step graph, greedy and sampling.

    Decoders keep `graphs[greedy] = (prefill graph, step graph)`; both variants are built because
    a batch picks one at run time (all rows greedy or not). A speculative decoder with adaptive K
    keeps `{K: step graph}` for its two K: the long one is "spec_step_<variant>", the short one
    "spec_step_k<K>_<variant>".
    """
    build = decoder.build
    specs = []
    for greedy in (True, False):
        variant = "greedy" if greedy else "sampling"
        prefill, steps = decoder.graphs[greedy]
        steps = steps if isinstance(steps, dict) else {None: steps}
        graphs = [(prefill, build.prefill_buckets, "")]
        graphs += [(step, (None,), f"k{k}_" if i else "") for i, (k, step) in enumerate(steps.items())]
        for graph, buckets, k_tag in graphs:
            kind = GRAPH_KINDS[type(graph)]
            for bucket in buckets:
                name = f"{kind}_b{bucket}_{variant}" if bucket is not None else f"{kind}_{k_tag}{variant}"
                specs.append(GraphSpec(name, kind, bucket, greedy, graph, example_inputs(graph, build, bucket),
                                       state_names(graph), tuple(compiler_args)))
    return specs


@contextmanager
def stand_in_state(spec: GraphSpec, device: torch.device) -> Iterator[list[Tensor]]:
    """Swap the graph's state buffers for fresh device tensors of the same shapes, for one trace.

    Tracing updates the state lazily, and a trace taken only to read its HLO is never run: its
    pending updates must not reach the real state (or the next graph's HLO). Fresh device data
    lowers to the same HLO parameters as the real state.
    """
    owners = [(spec.module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
              for name in spec.state_names]
    originals = [owner._buffers[attr] for owner, attr in owners]
    for (owner, attr), buffer in zip(owners, originals):
        owner._buffers[attr] = torch.zeros(buffer.shape, dtype=buffer.dtype).to(device)
    try:
        yield [owner._buffers[attr] for owner, attr in owners]
    finally:
        for (owner, attr), buffer in zip(owners, originals):
            owner._buffers[attr] = buffer


def trace_hlo(spec: GraphSpec, backend: XlaBackend) -> tuple[str, tuple[Tensor, ...]]:
    """The graph's HLO text (outputs, then state), and its outputs as meta tensors; nothing runs.

    Only for reading: lowering state that was updated through views (the prefill graphs) changes
    the IR a later sync would compile, so the graphs to compile run apart, as the engine runs them.
    """
    with stand_in_state(spec, backend.device) as state:
        outputs = backend.trace(spec.module, spec.example_inputs)
        hlo = hlo_text([*outputs, *state])
    return hlo, type(outputs)(*(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in outputs))
