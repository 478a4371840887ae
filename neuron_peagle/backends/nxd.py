"""The nxd backend on a trn1/trn2 instance (the torch-xla stack of Neuron 2.31): every graph of an engine is one key of one
neuronx-distributed `NxDModel`, built ahead of time and run from an artifact directory.

The Neuron SDK is imported only inside `require_sdk`, so everything else runs (and is tested)
without it; with it missing, every entry point raises BackendUnavailableError with INSTALL_HINT.
The plain-PyTorch half (the traced wrapper, the shared weight dict, the call router) is in
`nxd_graphs.py`; this module is only the SDK calls (ModelBuilderV2's units, neuronx-distributed
`trace/functions.py`, `trace/nxd_model/nxd_model.py`):

- build: `trace(NxdGraph, kwargs=example inputs)` per graph; `compile(hlo, metaneff,
  compiler_workdir=..., compiler_args="...", key=name)` -> a NEFF per graph; then
  `NxDModel(world_size=N).add(key, trace_artifacts, CompilationArtifacts(neff_filepath=...))` for
  every graph and `save(path, save_weights=False)`: one TorchScript file, no weights in it.
- load: `NxDModel.load(path)`, `set_weights([one weight dict per rank])` (the engine's own modules,
  built from the checked model directory, provide it), `to_neuron()`: one device copy of the weights
  and of every state buffer per rank, passed to every key.
- run: `model(model_name=key, **inputs)`, the key picked by `GraphRouter` from the graph module the
  runner calls and its input shapes; host tensors in and out, as on the other backends.

Tensor parallelism (world_size N > 1): the target's decoder layers run on NxD's parallel layers and
the per-rank weight dicts come from NxD's `shard_checkpoint` (`nxd_parallel.py`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.backends.nxd_graphs import NxdBundle, NxdGraph, graph_kwargs
from neuron_peagle.errors import ArtifactError, BackendUnavailableError
from neuron_peagle.files import atomic_path
from neuron_peagle.state_writes import StateWrites, use_state_writes

INSTALL_HINT = (
    "the nxd backend needs the Neuron SDK 2.31 torch-xla stack (torch-neuronx 2.9, neuronx-cc 2.26, "
    "neuronx-distributed 0.19, nki 0.5: the neuron-trn1 extra) on a trn1/trn2 instance, installed from the Neuron "
    "SDK's own pip repository into the torch-xla environment (make setup-xla); on other machines use --backend xla "
    "there, or inductor/eager in the main environment"
)
NEEDS_ARTIFACTS = (
    "the nxd backend runs graphs compiled ahead of time: build them with `python -m compile.build "
    "--backend nxd --out DIR` and load them with `Engine.from_compiled(DIR)` (`neuron-peagle generate "
    "--artifacts DIR`)"
)


@dataclass(frozen=True)
class NxdApi:
    """The neuronx-distributed entry points this backend uses, imported once."""

    NxDModel: Any  # neuronx_distributed.NxDModel
    trace: Callable  # neuronx_distributed.trace.functions.trace
    compile: Callable  # neuronx_distributed.trace.functions.compile
    CompilationArtifacts: Any  # neuronx_distributed.trace.model_builder_utils.CompilationArtifacts
    # Tensor parallelism (backends/nxd_parallel.py)
    NxDParallelState: Any  # neuronx_distributed.trace.parallel_context.NxDParallelState
    ColumnParallelLinear: Any  # neuronx_distributed.parallel_layers.layers.ColumnParallelLinear
    RowParallelLinear: Any  # neuronx_distributed.parallel_layers.layers.RowParallelLinear
    shard_checkpoint: Callable  # neuronx_distributed.trace.functions.shard_checkpoint


def require_sdk() -> NxdApi:
    """The SDK entry points, or BackendUnavailableError saying what to install."""
    try:
        import torch_neuronx  # noqa: F401  (the runtime NxD drives; checked here for a clear message)
        from neuronx_distributed import NxDModel
        # The fundamental units; `trace.model_builder` keeps only deprecated wrappers of these.
        from neuronx_distributed.trace.functions import compile as nxd_compile
        from neuronx_distributed.trace.functions import trace as nxd_trace
        from neuronx_distributed.trace.model_builder_utils import CompilationArtifacts
        from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, RowParallelLinear
        from neuronx_distributed.trace.functions import shard_checkpoint
        from neuronx_distributed.trace.parallel_context import NxDParallelState
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return NxdApi(NxDModel, nxd_trace, nxd_compile, CompilationArtifacts, NxDParallelState, ColumnParallelLinear,
                  RowParallelLinear, shard_checkpoint)


class NxdBackend:
    name = "nxd"
    device = torch.device("cpu")  # runners hand over host tensors; weights and state live in the NxDModel

    def __init__(self) -> None:
        self._api = require_sdk()
        self._model = None
        self._bundle: NxdBundle | None = None

    def prepare(self, module: nn.Module, rows_per_call: int = 1) -> nn.Module:
        """Weights stay on the host: `load` hands them, as one dict, to the NxDModel (whose compiler lays
        them out)."""
        use_state_writes(module, StateWrites.REBIND)
        return module

    def load(self, model_path: Path, bundle: NxdBundle, weights: list[dict[str, Tensor]] | None = None) -> None:
        """Load the saved NxDModel, give it one weight dict per rank (default: the bundle's, for one rank)
        and put it on the NeuronCores."""
        weights = weights if weights is not None else [bundle.checkpoint]
        model = self._api.NxDModel.load(str(model_path))
        if not isinstance(model, self._api.NxDModel):
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


def trace_graph(api: NxdApi, name: str, graph: NxdGraph, kwargs: dict[str, Tensor]):
    """NxD's TraceArtifacts of one graph (module on the CPU; nothing is compiled).

    The graph's state modules are switched to `StateWrites.REBIND` first (the build prepares them on
    the xla backend, in place): NxD aliases a state buffer to its update (keeps it on the device,
    written in place) only when the forward rebinds the buffer to an out-of-place result; an in-place
    update of a buffer is not supported and could be lost on the device."""
    use_state_writes(graph, StateWrites.REBIND)
    try:
        return api.trace(graph, kwargs=kwargs)
    except RuntimeError as err:
        raise ArtifactError(f"neuronx-distributed could not trace graph {name}: {err}") from err


def compile_graph(api: NxdApi, name: str, traced, compiler_args: tuple[str, ...], workdir: Path,
                  neff_path: Path) -> None:
    """neuronx-cc on one traced graph; its NEFF is copied to `neff_path` (whole or not at all)."""
    try:
        artifacts = api.compile(traced.hlo, traced.metaneff, compiler_workdir=str(workdir),
                                compiler_args=" ".join(compiler_args), key=name)
    except RuntimeError as err:
        raise ArtifactError(f"neuronx-cc failed on graph {name} ({err}); its log-neuron-cc.txt is under "
                            f"{workdir / name}") from err
    neff_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(neff_path) as tmp:
        shutil.copyfile(artifacts.neff_filepath, tmp)


def save_model(api: NxdApi, traced: dict[str, Any], neffs: dict[str, Path], path: Path, world_size: int = 1) -> None:
    """One NxDModel for `world_size` ranks holding every graph under its planned name, saved without
    weights (whole or not at all: a previous build's model.pt stays until the new one is complete)."""
    model = api.NxDModel(world_size=world_size)
    for name, artifacts in traced.items():
        model.add(key=name, trace_artifacts=artifacts,
                  compilation_artifacts=api.CompilationArtifacts(neff_filepath=str(neffs[name])))
    with atomic_path(path) as tmp:
        model.save(str(tmp), save_weights=False)
