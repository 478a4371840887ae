"""Artifacts of the nxd backend: every planned graph becomes a key of one NxDModel saved as
`neuron/model.pt` (see backends/nxd.py for the SDK calls).

Build: the traced build's shared steps (xla HLO, audit, fingerprints, which graphs are up to date:
xla_artifacts.py) run first, the graphs on the XLA device. Then every graph is traced by
neuronx-distributed on the CPU, because the NxDModel needs the trace of each key; only the graphs that
are not up to date go through neuronx-cc, the others reuse their NEFF from the previous build. Finally the
NxDModel is assembled from all of them and saved (no weights: the loader makes them from the model
directory it checked).

With tensor parallelism (`--tp-degree N`) the target's layers are NxD's parallel layers by then (the
backend's `prepare`, backends/nxd_parallel.py): each graph is traced once with a rank's shapes, the
NxDModel is saved for N ranks, and the manifest records the whole weight dict that `shard_checkpoint`
splits at load (its swapped projections at their whole shapes).

Load: each planned graph must take the inputs and hold the state it was built with, and the weight dict
made from the engine's own modules (from the checked model directory) must have the recorded names,
shapes and dtypes; then the NxDModel gets that dict (split per rank by NxD's `shard_checkpoint` when
sharded), goes onto the NeuronCores with one copy of the weights and of every state buffer shared by all
keys, and each graph is run once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neuron_peagle.backends.artifacts import ArtifactBuild, BuiltGraphs, LoadReport, check_plan
from neuron_peagle.backends.nxd_sdk import NxdApi, compile_graph, save_model, trace_graph
from neuron_peagle.backends.nxd_graphs import NxdBundle
from neuron_peagle.backends.nxd_parallel import NxdTensorParallel
from neuron_peagle.backends.xla_artifacts import audit_notes, compile_traced, stand_in_state, trace_all
from neuron_peagle.errors import ArtifactError
from neuron_peagle.graphs.interface import PlannedGraph
from neuron_peagle.runtime.manifest import NEURON_DIR, NEURON_MODEL_FILE, Manifest, TensorInfo, tensor_infos

ON_NEURON = "loaded onto the NeuronCore (a key of the NxDModel)"
# neuronx-cc's working directories, kept after a failed compile (the error names them), removed after a build.
COMPILER_WORKDIR = f"{NEURON_DIR}/compiler_workdir"


def neff_file(name: str) -> str:
    return f"{NEURON_DIR}/{name}.neff"


class NxdBuild:
    """Trace, compile (or reuse) and assemble the graphs of one engine into one NxDModel."""

    def __init__(self, api: NxdApi, specs: list[PlannedGraph], out: Path, sharding: NxdTensorParallel | None = None
                 ) -> None:
        self.api = api
        self.out = out
        self.world_size = sharding.degree if sharding is not None else 1
        for spec in specs:
            spec.module.cpu()  # NxD traces a CPU module and places it itself
        self.bundle = NxdBundle.of(specs)
        self.checkpoint: tuple[TensorInfo, ...] = tensor_infos(
            sharding.layout(self.bundle) if sharding is not None else self.bundle.checkpoint)
        self.traced: dict[str, object] = {}

    def _trace(self, spec: PlannedGraph) -> object:
        # Stand-in state: a trace updates the state it reads, and the real buffers must stay as built.
        with stand_in_state(spec, torch.device("cpu")):
            traced = trace_graph(self.api, spec.name, self.bundle.graphs[spec.name],
                                 self.bundle.example_inputs[spec.name])
        spec.module.cpu()
        self.traced[spec.name] = traced
        return traced

    def compile(self, spec: PlannedGraph, compiler_args: tuple[str, ...]) -> list[str]:
        """Trace and compile one graph; returns its files, relative to the artifact directory."""
        traced = self._trace(spec)
        compile_graph(self.api, spec.name, traced, compiler_args, self.out / COMPILER_WORKDIR,
                      self.out / neff_file(spec.name))
        return [neff_file(spec.name), NEURON_MODEL_FILE]

    def reuse(self, spec: PlannedGraph) -> None:
        """Trace an up-to-date graph for the NxDModel; its NEFF is the previous build's."""
        self._trace(spec)

    def save(self) -> None:
        neffs = {name: self.out / neff_file(name) for name in self.traced}
        save_model(self.api, self.traced, neffs, self.out / NEURON_MODEL_FILE, self.world_size)
        shutil.rmtree(self.out / COMPILER_WORKDIR, ignore_errors=True)


def build_nxd(backend, xla, plan: list[PlannedGraph], build: ArtifactBuild) -> BuiltGraphs:
    """Trace and audit every graph on the XLA device of `xla` (an XlaBackend: the HLO the NEFFs are compiled
    from), then trace, compile (or reuse) and assemble them into one NxDModel."""
    for graph in plan:
        graph.module.to(xla.device)
    sharding = backend.sharding
    if sharding is not None:
        sharding.persist_tables(plan)
    traced, fresh = trace_all(plan, xla, build)
    neuron = NxdBuild(backend.api, plan, build.out, sharding)
    records = compile_traced(traced, fresh, build, backend.name,
                             lambda graph: neuron.compile(graph, build.compiler_args), neuron.reuse)
    neuron.save()
    return BuiltGraphs(records, [t.graph.name for t in traced if t.graph.name not in fresh], 0, audit_notes(traced),
                       neuron.checkpoint)


def _checkpoint_difference(built: tuple[TensorInfo, ...], now: tuple[TensorInfo, ...]) -> str | None:
    before, after = {t.name: t for t in built}, {t.name: t for t in now}
    for name in sorted(set(before) | set(after)):
        if name not in after:
            return f"{name} is missing"
        if name not in before:
            return f"{name} was not there when they were built"
        if before[name] != after[name]:
            return (f"{name} is {list(after[name].shape)} {after[name].dtype}, built as "
                    f"{list(before[name].shape)} {before[name].dtype}")
    return None


def check_nxd_plan(plan: list[PlannedGraph], manifest: Manifest, checkpoint: dict) -> None:
    """What the NxDModel relies on and the loading process provides: the planned graphs, each with
    the inputs and state it was built with, and the weight dict with the recorded tensors."""
    check_plan(plan, manifest)
    for graph in plan:
        record = manifest.graph(graph.name)
        for part, now, built in (("inputs", TensorInfo.of_named(graph.example_inputs), record.inputs),
                                 ("state", tuple(TensorInfo.of(n, t) for n, t in graph.state_buffers.items()),
                                  record.state)):
            if now != built:
                raise ArtifactError(f"graph {graph.name} now has {part} {[(t.name, list(t.shape)) for t in now]}, "
                                    f"built with {[(t.name, list(t.shape)) for t in built]}: the graph code "
                                    "changed since; rebuild the artifacts")
    difference = _checkpoint_difference(manifest.neuron_checkpoint, tensor_infos(checkpoint))
    if difference is not None:
        raise ArtifactError(f"the weight dict the compiled graphs read does not match: {difference}; the model "
                            "code changed since the build; rebuild the artifacts")


def load_nxd(backend, directory: Path, plan: list[PlannedGraph], manifest: Manifest) -> LoadReport:
    """The NxDModel with the engine's weights (split per rank when sharded), every graph run once."""
    sharding = backend.sharding
    if sharding is not None:
        sharding.persist_tables(plan)
    bundle = NxdBundle.of(plan)
    checkpoint = sharding.whole_checkpoint(bundle) if sharding is not None else bundle.checkpoint
    check_nxd_plan(plan, manifest, checkpoint)
    weights = sharding.rank_checkpoints(bundle, checkpoint) if sharding is not None else [checkpoint]
    backend.load(directory / NEURON_MODEL_FILE, bundle, weights)
    ranks = f" on {manifest.tp_degree} ranks" if manifest.tp_degree > 1 else ""
    report = LoadReport(directory, f"NxDModel {directory / NEURON_MODEL_FILE}{ranks}")
    for graph in plan:
        backend.run(graph.module, graph.example_inputs)
        report.graphs[graph.name] = ON_NEURON
    return report
