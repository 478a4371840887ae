"""The backend interface: what a backend does with the engine's graphs.

Everything that differs between devices is a backend's: its static facts are its `Capabilities`
(capabilities.BACKENDS: read by the engine, the runners, the command line and the build without comparing
names), its behaviour the methods below (placing modules, running a graph, building and loading
artifacts, profiling a session).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from torch import Tensor, nn

from neuron_peagle.capabilities import Capabilities

if TYPE_CHECKING:
    from neuron_peagle.backends.artifacts import ArtifactBuild, BuiltGraphs, LoadReport
    from neuron_peagle.backends.profilers import ProfilerSession
    from neuron_peagle.graphs.interface import PlannedGraph
    from neuron_peagle.runtime.manifest import Manifest

Outputs = TypeVar("Outputs", bound=tuple)
Shapes = tuple[tuple[int, ...], ...]


def held_modules(graphs: Sequence[nn.Module]) -> nn.Module:
    """The graphs as one module, for `prepare`: the graphs share their target, caches and state, and a walk
    over `modules()` of this one visits each shared module once."""
    return nn.ModuleList(graphs)


def shapes_of(inputs: Sequence[Tensor]) -> Shapes:
    """The shapes of a graph call's inputs: with the graph, what picks its compiled form."""
    return tuple(tuple(t.shape) for t in inputs)


class Backend(Protocol):
    name: str
    device: torch.device
    capabilities: Capabilities

    def prepare(self, graphs: Sequence[nn.Module]) -> None:
        """Place every module the graphs hold (weights, caches, state) on the device, once, and make the
        backend's own choices for them: how weights sit in memory, how state is written."""

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]) -> Outputs:
        """Run one graph on host inputs; return its outputs as host tensors, state updated."""

    def compile_count(self) -> int:
        """Graphs compiled so far in this process (0 for a backend that does not compile)."""

    def use_artifacts(self, directory: Path, writable: bool) -> str:
        """Point the compiler's caches at an artifact directory, before anything is compiled; says which
        cache is used (or why none can be). `writable`: a build, which must be able to fill them."""

    def build_artifacts(self, plan: "list[PlannedGraph]", build: "ArtifactBuild") -> "BuiltGraphs":
        """Compile every planned graph into `build.out`; the manifest's graph records."""

    def load_artifacts(self, directory: Path, plan: "list[PlannedGraph]", manifest: "Manifest") -> "LoadReport":
        """Check the planned graphs against the artifacts and make each ready to run, warmed."""

    def profiler(self, out_dir: Path, trace: bool) -> "ProfilerSession":
        """The profilers of one session on this backend, writing into `out_dir`."""
