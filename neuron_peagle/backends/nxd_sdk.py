"""The neuronx-distributed SDK as the nxd backend calls it (the torch-xla stack of Neuron 2.31): imported
only inside `require_sdk`, so everything else runs (and is tested) without it; with it missing, every
entry point raises BackendUnavailableError with INSTALL_HINT. The calls are ModelBuilderV2's units,
neuronx-distributed `trace/functions.py` and `trace/nxd_model/nxd_model.py`:

- `trace(NxdGraph, kwargs=example inputs)` per graph; `compile(hlo, metaneff, compiler_workdir=...,
  compiler_args="...", key=name)` -> a NEFF per graph; then `NxDModel(world_size=N).add(key,
  trace_artifacts, CompilationArtifacts(neff_filepath=...))` for every graph and `save(path,
  save_weights=False)`: one TorchScript file, no weights in it.
- `NxDModel.load(path)`, `set_weights([one weight dict per rank])`, `to_neuron()` (backends/nxd.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from neuron_peagle.backends.nxd_graphs import NxdGraph
from neuron_peagle.errors import ArtifactError, BackendUnavailableError
from neuron_peagle.files import atomic_path
from neuron_peagle.state_writes import StateWrites, use_state_writes

INSTALL_HINT = (
    "the nxd backend needs the Neuron SDK 2.31 torch-xla stack (torch-neuronx 2.9, neuronx-cc 2.26, "
    "neuronx-distributed 0.19, nki 0.5: the neuron-trn1 extra) on a trn1/trn2 instance, installed from the Neuron "
    "SDK's own pip repository into the torch-xla environment (make setup-xla); on other machines use --backend xla "
    "there, or inductor/eager in the main environment"
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
    # neuronx_distributed.parallel_layers.mappings: the all-reduce over the tensor-parallel group (the
    # partial outputs of a rank's experts)
    reduce_from_tensor_model_parallel_region: Callable


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
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region
        from neuronx_distributed.trace.functions import shard_checkpoint
        from neuronx_distributed.trace.parallel_context import NxDParallelState
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return NxdApi(NxDModel, nxd_trace, nxd_compile, CompilationArtifacts, NxDParallelState, ColumnParallelLinear,
                  RowParallelLinear, shard_checkpoint, reduce_from_tensor_model_parallel_region)


def trace_graph(api: NxdApi, name: str, graph: NxdGraph, kwargs: dict[str, Tensor]):
    """NxD's TraceArtifacts of one graph (module on the CPU; nothing is compiled).

    NxD aliases a state buffer to its update (keeps it on the device, written in place) only when the
    forward rebinds the buffer to an out-of-place result; an in-place update of a buffer is not supported
    and could be lost on the device. The nxd backend prepares every graph that way (`StateWrites.REBIND`);
    set again here, for a graph traced from anywhere else."""
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
