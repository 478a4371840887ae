"""The graphs a build compiles: the engine's planned graphs (graphs/interface.py) with compiler arguments.

Every artifact backend starts from the same list of `GraphSpec`s: the inductor/neuron build compiles
each through torch.compile into the compile cache it ships, the xla build hands each to torch-xla
(and its persistent compilation cache), the nxd build makes each a key of one neuronx-distributed
NxDModel (backends/nxd_graphs.py). Loading plans again with the same code, so the loaded engine
names and calls exactly the graphs that were built; warming a loaded engine with the example inputs
must leave generation nothing to compile, which the tests check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from neuron_peagle.backends.xla import XlaBackend, hlo_text
from neuron_peagle.errors import ConfigError
from neuron_peagle.graphs.interface import GRAPH_KINDS, PREFILL_KINDS, GraphRunner, PlannedGraph, plan

__all__ = ["GRAPH_KINDS", "PREFILL_KINDS", "GraphSpec", "neuron_compiler_args", "plan_graphs", "trace_hlo"]

# The flags NxD uses for transformer graphs (see docs): no implicit down-casting, inf saturation.
NEURON_COMPILER_FLAGS = ("--enable-saturate-infinity", "--auto-cast=none", "--model-type=transformer", "-O1")
TARGETS = ("trn1", "trn2")


def neuron_compiler_args(target: str) -> tuple[str, ...]:
    """neuronx-cc arguments for every graph of a build for `target` (trn1 or trn2)."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    return (*NEURON_COMPILER_FLAGS, "--target", target)


@dataclass(frozen=True)
class GraphSpec(PlannedGraph):
    """A planned graph (graphs/interface.py) with the compiler arguments it is built with."""

    compiler_args: tuple[str, ...] = ()


def plan_graphs(runner: GraphRunner, compiler_args: tuple[str, ...]) -> list[GraphSpec]:
    """Every graph `runner` runs (graphs.interface.plan), each with `compiler_args`."""
    return [GraphSpec(**{f.name: getattr(p, f.name) for f in fields(PlannedGraph)}, compiler_args=tuple(compiler_args))
            for p in plan(runner)]


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
