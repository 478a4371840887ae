"""The plain-PyTorch half of the nxd backend: how the planned graphs of one engine become the
keys of ONE neuronx-distributed `NxDModel`, so that they share one device copy of the weights and
of every state buffer (KV caches, speculative state). No Neuron import here: all of it runs, and
is tested, on CPU; `backends/nxd.py` hands it to the SDK.

Why an NxDModel: it holds several compiled graphs under string keys, loads one weight dict and one
set of state tensors to the device, and passes the same tensors to every graph (`set_weights`,
`to_neuron`); `model(model_name=key, **inputs)` runs one graph. Its keys must share one forward
signature, and it aliases a buffer only when the forward rebinds the buffer to the result of an
out-of-place op (ModelBuilderV2's rule: in-place updates of a buffer are not supported), so
`backends/nxd.py` traces every graph with its state modules in `StateWrites.REBIND`
(neuron_peagle.state_writes), where the graphs update their state that way. Hence the three pieces:

- `NxdGraph`: a planned graph behind the forward signature every key shares (the union of the
  graphs' declared inputs, each an optional keyword); a state buffer the graph leaves alone is
  rebound to a copy, so that every key aliases the same state. Parameter and buffer names are the
  graph's, under `graph.`, so the same weight or cache has the same name in every key.
- `NxdBundle.checkpoint`: the one weight dict for all keys, every parameter and read-only buffer
  (rotary tables, datastore tables, d2t) by name; a name that means two different tensors is
  refused. No state buffer: NxD makes the state itself, zeroed on the device, and a second copy
  in the weights would only take HBM.
- `GraphRouter`: which key a runner call means, from the graph module it calls and its input
  shapes (the shapes pick the prefill bucket, the module picks greedy or sampling and the kind).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

from torch import Tensor, nn

from neuron_peagle.backends.base import Shapes, shapes_of
from neuron_peagle.errors import ArtifactError
from neuron_peagle.graphs.interface import PlannedGraph, state_names

class NxdGraph(nn.Module):
    """One planned graph as neuronx-distributed traces it: keyword inputs, outputs as a plain tuple,
    every state buffer rebound to a new tensor (the out-of-place update NxD aliases): by the graph's
    own updates in `StateWrites.REBIND`, else to a copy at the end."""

    def __init__(self, graph: nn.Module, state_names: tuple[str, ...]) -> None:
        super().__init__()
        self.graph = graph
        self.state_names = state_names

    def forward(self, input_ids: Tensor | None = None, lengths: Tensor | None = None, slot: Tensor | None = None,
                tokens: Tensor | None = None, positions: Tensor | None = None, temperature: Tensor | None = None,
                top_k: Tensor | None = None, top_p: Tensor | None = None, accept_uniform: Tensor | None = None,
                sample_uniform: Tensor | None = None) -> tuple[Tensor, ...]:
        given = {"input_ids": input_ids, "lengths": lengths, "slot": slot, "tokens": tokens, "positions": positions,
                 "temperature": temperature, "top_k": top_k, "top_p": top_p, "accept_uniform": accept_uniform,
                 "sample_uniform": sample_uniform}
        inputs = self.graph.Inputs(**{name: given[name] for name in self.graph.Inputs._fields})
        before = {name: self.graph.get_buffer(name) for name in self.state_names}
        outputs = tuple(self.graph(*inputs))
        for name, buffer in before.items():
            if self.graph.get_buffer(name) is buffer:  # not rebound by the graph: alias it all the same
                owner_name, _, attr = name.rpartition(".")
                setattr(self.graph.get_submodule(owner_name), attr, buffer.clone())
        return outputs


# The keyword inputs every NxdGraph accepts, in signature order.
INPUT_NAMES: tuple[str, ...] = tuple(p for p in inspect.signature(NxdGraph.forward).parameters if p != "self")


def graph_kwargs(inputs: NamedTuple) -> dict[str, Tensor]:
    """A graph's `Inputs` tuple as the keyword arguments its NxD key was traced with."""
    return dict(inputs._asdict())


class GraphRouter:
    """(graph module, input shapes) -> the planned name, which is the graph's NxDModel key."""

    def __init__(self, routes: dict[tuple[nn.Module, Shapes], str]) -> None:
        self.routes = routes

    @classmethod
    def of(cls, specs: Sequence[PlannedGraph]) -> "GraphRouter":
        routes: dict[tuple[nn.Module, Shapes], str] = {}
        for spec in specs:
            route = (spec.module, shapes_of(spec.example_inputs))
            if route in routes:
                raise ArtifactError(f"graphs {routes[route]} and {spec.name} are the same module with the same "
                                    "input shapes: a call could not tell them apart")
            routes[route] = spec.name
        return cls(routes)

    def key(self, graph: nn.Module, inputs: Sequence[Tensor]) -> str:
        try:
            return self.routes[(graph, shapes_of(inputs))]
        except KeyError:
            known = sorted(name for (module, _), name in self.routes.items() if module is graph)
            raise ArtifactError(f"no compiled graph takes {type(graph).__name__} inputs of shapes "
                                f"{list(shapes_of(inputs))} (this module's compiled graphs: {known}); the "
                                "artifacts were built for other shapes") from None


def hold_every_state(graphs: Sequence[nn.Module]) -> None:
    """Give each graph the state modules only others hold, under the same attribute names (a prefill's
    one-row twin of the state, graphs/slots.py, is held by the prefill graphs alone): one NxDModel has
    one set of state buffers for all its keys. A graph passes such state through unchanged (NxdGraph
    aliases it to a copy). Called when the backend prepares the graphs, before they are planned."""
    owners: dict[str, nn.Module] = {}
    for graph in graphs:
        for name, child in graph.named_children():
            if state_names(child):
                owners.setdefault(name, child)
    for graph in graphs:
        for name, child in owners.items():
            if not hasattr(graph, name):
                graph.add_module(name, child)


def shared_checkpoint(graphs: Sequence[NxdGraph]) -> dict[str, Tensor]:
    """Every parameter and read-only buffer of every graph by name (aliases of one tensor included),
    once; no state buffer (under any of its names), which NxD keeps apart, zeroed on the device.

    All keys of the NxDModel read this one dict, so a name must mean the same tensor in every graph
    it appears in."""
    held: dict[str, Tensor] = {}
    for graph in graphs:
        state = {id(graph.graph.get_buffer(name)) for name in graph.state_names}
        for name, tensor in chain(graph.named_parameters(remove_duplicate=False),
                                  graph.named_buffers(remove_duplicate=False)):
            if id(tensor) in state:
                continue
            if held.setdefault(name, tensor) is not tensor:
                raise ArtifactError(f"{name} names two different tensors in two graphs of one engine: they cannot "
                                    "share one weight dict")
    # Contiguous for NxD, one copy per tensor: aliases (a tied LM head and the embedding) stay one tensor.
    laid_out: dict[int, Tensor] = {}
    for tensor in held.values():
        if id(tensor) not in laid_out:
            laid_out[id(tensor)] = tensor.detach().contiguous()
    return {name: laid_out[id(tensor)] for name, tensor in held.items()}


@dataclass(frozen=True)
class NxdBundle:
    """The planned graphs of one engine, ready for one NxDModel."""

    graphs: dict[str, NxdGraph]  # planned name (the NxDModel key) -> the module NxD traces
    example_inputs: dict[str, dict[str, Tensor]]  # planned name -> its trace kwargs
    checkpoint: dict[str, Tensor]  # the weight dict every key reads
    router: GraphRouter

    @classmethod
    def of(cls, specs: Sequence[PlannedGraph]) -> "NxdBundle":
        # NxDModel makes its device state from the first key's state: every key must hold the same.
        states = {frozenset(spec.state_names) for spec in specs}
        if len(states) > 1:
            first = specs[0]
            odd = next(spec for spec in specs if set(spec.state_names) != set(first.state_names))
            raise ArtifactError(f"graphs {first.name} and {odd.name} hold different state "
                                f"({sorted(set(first.state_names) ^ set(odd.state_names))}): one NxDModel "
                                "shares one set of state buffers between all its graphs")
        graphs = {spec.name: NxdGraph(spec.module, spec.state_names) for spec in specs}
        return cls(graphs, {spec.name: graph_kwargs(spec.example_inputs) for spec in specs},
                   shared_checkpoint(list(graphs.values())), GraphRouter.of(specs))
