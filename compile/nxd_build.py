"""The nxd half of `python -m compile.build --backend nxd`: every planned graph becomes a key of
one NxDModel saved as `neuron/model.pt` (see neuron_peagle/backends/nxd.py for the SDK calls).

The build's shared steps (plan, xla HLO, audit, fingerprints, which graphs are up to date) run
first, as for xla. Then every graph is traced by neuronx-distributed, because the NxDModel needs
the trace of each key; only the graphs that are not up to date go through neuronx-cc, the others
reuse their NEFF from the previous build. Finally the NxDModel is assembled from all of them and
saved (no weights: the loader makes them from the model directory it checked).

With tensor parallelism (`--tp-degree N`) the target's layers are NxD's parallel layers by then
(neuron_peagle/backends/nxd_parallel.py): each graph is traced once with a rank's shapes, the NxDModel
is saved for N ranks, and the manifest records the whole weight dict that `shard_checkpoint` splits at
load (its swapped projections at their whole shapes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neuron_peagle.runtime.manifest import NEURON_DIR, NEURON_MODEL_FILE, TensorInfo, tensor_infos
from neuron_peagle.runtime.graph_specs import GraphSpec, stand_in_state
from neuron_peagle.backends.nxd import compile_graph, require_sdk, save_model, trace_graph
from neuron_peagle.backends.nxd_graphs import NxdBundle
from neuron_peagle.backends.nxd_parallel import NxdTensorParallel

# neuronx-cc's working directories, kept after a failed compile (the error names them), removed after a build.
COMPILER_WORKDIR = f"{NEURON_DIR}/compiler_workdir"


def neff_file(name: str) -> str:
    return f"{NEURON_DIR}/{name}.neff"


class NxdBuild:
    """Trace, compile (or reuse) and assemble the graphs of one engine into one NxDModel."""

    def __init__(self, specs: list[GraphSpec], out: Path, sharding: NxdTensorParallel | None = None) -> None:
        self.api = require_sdk()
        self.out = out
        self.world_size = sharding.degree if sharding is not None else 1
        for spec in specs:
            spec.module.cpu()  # NxD traces a CPU module and places it itself
        self.bundle = NxdBundle.of(specs)
        self.checkpoint: tuple[TensorInfo, ...] = tensor_infos(
            sharding.layout(self.bundle) if sharding is not None else self.bundle.checkpoint)
        self.traced: dict[str, object] = {}

    def _trace(self, spec: GraphSpec) -> object:
        # Stand-in state: a trace updates the state it reads, and the real buffers must stay as built.
        with stand_in_state(spec, torch.device("cpu")):
            traced = trace_graph(self.api, spec.name, self.bundle.graphs[spec.name],
                                 self.bundle.example_inputs[spec.name])
        spec.module.cpu()
        self.traced[spec.name] = traced
        return traced

    def compile(self, spec: GraphSpec) -> list[str]:
        """Trace and compile one graph; returns its files, relative to the artifact directory."""
        traced = self._trace(spec)
        compile_graph(self.api, spec.name, traced, spec.compiler_args, self.out / COMPILER_WORKDIR,
                      self.out / neff_file(spec.name))
        return [neff_file(spec.name), NEURON_MODEL_FILE]

    def reuse(self, spec: GraphSpec) -> None:
        """Trace an up-to-date graph for the NxDModel; its NEFF is the previous build's."""
        self._trace(spec)

    def save(self) -> None:
        neffs = {name: self.out / neff_file(name) for name in self.traced}
        save_model(self.api, self.traced, neffs, self.out / NEURON_MODEL_FILE, self.world_size)
        shutil.rmtree(self.out / COMPILER_WORKDIR, ignore_errors=True)
