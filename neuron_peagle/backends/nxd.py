"""The nxd backend on a trn1/trn2 instance (the torch-xla stack of Neuron 2.31): every graph of an engine is
one key of one neuronx-distributed `NxDModel`, built ahead of time and run from an artifact directory.

- prepare: weights stay on the host (the NxDModel gets them as one dict at load); state is written by
  rebinding buffers to out-of-place results, the only update NxD aliases; with a tensor-parallel degree
  N above 1 the target's decoder layers go onto NxD's parallel layers (nxd_parallel.py), under NxD's
  parallel state, which the backend holds for its whole life (layers are built, traced and sharded
  under it).
- build / load: nxd_artifacts.py; the SDK calls are nxd_sdk.py, the plain-PyTorch half (the traced
  wrapper, the shared weight dict, the call router) nxd_graphs.py.
- run: `model(model_name=key, **inputs)`, the key picked by `GraphRouter` from the graph module the
  runner calls and its input shapes; host tensors in and out, as on the other backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.backends.base import held_modules
from neuron_peagle.backends.nxd_graphs import NxdBundle, graph_kwargs, hold_every_state
from neuron_peagle.backends.nxd_sdk import INSTALL_HINT, require_sdk
from neuron_peagle.capabilities import BACKENDS
from neuron_peagle.graphs.interface import target_caches
from neuron_peagle.errors import ArtifactError, BackendUnavailableError
from neuron_peagle.runtime.manifest import NEURON_MODEL_FILE
from neuron_peagle.state_writes import StateWrites, use_state_writes

__all__ = ["INSTALL_HINT", "NxdBackend"]

NEEDS_ARTIFACTS = (
    "the nxd backend runs graphs compiled ahead of time: build them with `python -m compile.build "
    "--backend nxd --out DIR` and load them with `Engine.from_compiled(DIR)` (`neuron-peagle generate "
    "--artifacts DIR`)"
)


class NxdBackend:
    name = "nxd"
    capabilities = BACKENDS["nxd"]
    device = torch.device("cpu")  # runners hand over host tensors; weights and state live in the NxDModel

    def __init__(self, tp_degree: int = 1) -> None:
        from neuron_peagle.backends.nxd_parallel import parallel_state

        self.api = require_sdk()
        self.tp_degree = tp_degree
        self.sharding = None  # nxd_parallel.NxdTensorParallel of the target, once prepared (degree > 1)
        self._parallel = contextlib.ExitStack()
        self._parallel.enter_context(parallel_state(tp_degree))
        self._model = None
        self._bundle: NxdBundle | None = None

    def prepare(self, graphs: Sequence[nn.Module]) -> None:
        """Weights stay on the host: `load` hands them, as one dict, to the NxDModel (whose compiler lays
        them out). Sharded: the target (every graph's `target`, with its KV caches) on NxD's parallel
        layers."""
        # NxD aliases a buffer to its update only when it is rebound to one.
        use_state_writes(held_modules(graphs), StateWrites.REBIND)
        hold_every_state(graphs)
        if self.tp_degree > 1 and self.sharding is None:
            from neuron_peagle.backends.nxd_parallel import NxdTensorParallel

            self.sharding = NxdTensorParallel.of(graphs[0].target, target_caches(graphs), self.tp_degree)

    def load(self, model_path: Path, bundle: NxdBundle, weights: list[dict[str, Tensor]] | None = None) -> None:
        """Load the saved NxDModel, give it one weight dict per rank (default: the bundle's, for one rank)
        and put it on the NeuronCores."""
        weights = weights if weights is not None else [bundle.checkpoint]
        model = self.api.NxDModel.load(str(model_path))
        if not isinstance(model, self.api.NxDModel):
            raise ArtifactError(f"{model_path} does not restore as an NxDModel with the installed neuronx-distributed "
                                "(it keeps no compatibility across versions); rebuild the artifacts")
        missing = set(bundle.graphs) - set(model.get_available_keys())
        if missing:
            raise ArtifactError(f"{model_path} lacks the graphs {sorted(missing)}; rebuild the artifacts")
        world_size = getattr(model, "world_size", len(weights))
        if world_size != len(weights):
            raise ArtifactError(f"{model_path} holds graphs for {world_size} ranks, the engine made weights for "
                                f"{len(weights)}: the manifest's tp_degree and the NxDModel disagree; rebuild the "
                                "artifacts")
        model.set_weights(weights)
        model.to_neuron()
        self._model, self._bundle = model, bundle

    def run(self, graph: nn.Module, inputs: NamedTuple):
        if self._model is None:
            raise BackendUnavailableError(NEEDS_ARTIFACTS)
        key = self._bundle.router.key(graph, inputs)
        result = self._model(model_name=key, **graph_kwargs(inputs))
        outputs = (result,) if isinstance(result, Tensor) else tuple(result)
        return graph.Outputs(*(t.cpu() for t in outputs))

    def compile_count(self) -> int:
        return 0  # nothing compiles in the process: every graph is a NEFF from the artifacts

    def use_artifacts(self, directory: Path, writable: bool) -> str:
        return f"NxDModel {directory / NEURON_MODEL_FILE}"

    def build_artifacts(self, plan, build):
        from neuron_peagle.backends.nxd_artifacts import build_nxd
        from neuron_peagle.backends.xla import XlaBackend

        return build_nxd(self, XlaBackend(), plan, build)

    def load_artifacts(self, directory: Path, plan, manifest):
        from neuron_peagle.backends.nxd_artifacts import load_nxd

        return load_nxd(self, directory, plan, manifest)

    def profiler(self, out_dir: Path, trace: bool):
        from neuron_peagle.backends.profilers import profiler_for

        return profiler_for(self.capabilities.on_neuron_cores, out_dir, trace)
