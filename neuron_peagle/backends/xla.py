"""torch-xla: the graph is traced lazily, cut at `torch_xla.sync()`, compiled once per distinct HLO.

On CPU (PJRT_DEVICE=CPU) this lowers to the same HLO that neuronx-cc compiles on a trn instance, and
its compile counter proves that generation runs on a fixed set of graphs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from neuron_peagle.backends.base import held_modules
from neuron_peagle.capabilities import BACKENDS
from neuron_peagle.errors import ArtifactError, BackendUnavailableError
from neuron_peagle.runtime.manifest import XLA_CACHE_DIR
from neuron_peagle.state_writes import StateWrites, use_state_writes


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.debug.metrics as metrics
    except ImportError as err:  # pragma: no cover - torch-xla is a pinned dependency
        raise BackendUnavailableError(f"the xla backend needs torch-xla==2.9.0 ({err})") from None
    return torch_xla, metrics


class XlaBackend:
    name = "xla"
    capabilities = BACKENDS["xla"]

    def __init__(self) -> None:
        self._xla, self._metrics = _torch_xla()
        self.device = self._xla.device()
        self._cache_note = "no artifacts"

    def prepare(self, graphs: Sequence[nn.Module]) -> None:
        held = held_modules(graphs).to(self.device)  # the compiler lays the weights out
        use_state_writes(held, StateWrites.IN_PLACE)  # an in-place update is donated, a rebinding copied
        self._xla.sync()

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        outputs = self.trace(graph, inputs)
        self.sync()
        return type(outputs)(*(t.cpu() for t in outputs))

    def trace(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        """Record one graph call on the device without running it: its outputs and in-place state
        updates stay pending until `sync()`. Keep the outputs alive until then, or the compiled
        graph loses them."""
        with torch.no_grad():
            return graph(*(t.to(self.device) for t in inputs))

    def sync(self) -> None:
        # One sync = one graph: the pending outputs and every in-place state update (the caches).
        self._xla.sync()

    def compile_count(self) -> int:
        return self.counter("UncachedCompile")

    def counter(self, name: str) -> int:
        """A torch-xla metrics counter, e.g. "PersistentCacheHit" (0 until it first counts)."""
        return int(self._metrics.counter_value(name) or 0)

    def hlo_text(self, tensors: list[Tensor]) -> str:
        return hlo_text(tensors)

    def use_artifacts(self, directory: Path, writable: bool) -> str:
        """Point torch-xla's persistent cache into the artifact directory: possible only before this process
        compiles anything. A build refuses a process that has; a load warns and compiles instead (the same
        graphs, so the same output; only the start-up cost differs)."""
        cache_dir = directory / XLA_CACHE_DIR
        if initialize_persistent_cache(cache_dir, readonly=not writable):
            self._cache_note = f"persistent cache in {cache_dir}"
        elif writable:
            raise ArtifactError(
                f"this process has already compiled XLA graphs, so torch-xla's persistent cache can no longer "
                f"be pointed at {cache_dir}; run the build in a fresh process (python -m compile.build)")
        else:
            warnings.warn(f"this process compiled XLA graphs before loading {directory}, so torch-xla's persistent "
                          "cache cannot be pointed at its xla_cache: every graph is compiled now instead; load "
                          "artifacts first thing in a process to skip that", RuntimeWarning, stacklevel=4)
            self._cache_note = "cache not usable: this process compiled XLA graphs before"
        return self._cache_note

    def build_artifacts(self, plan, build):
        from neuron_peagle.backends.xla_artifacts import build_xla

        return build_xla(self, plan, build)

    def load_artifacts(self, directory: Path, plan, manifest):
        from neuron_peagle.backends.xla_artifacts import load_xla

        return load_xla(self, directory, plan, manifest, self._cache_note)

    def profiler(self, out_dir: Path, trace: bool):
        from neuron_peagle.backends.profilers import XlaMetrics

        return XlaMetrics(out_dir, trace)


def hlo_text(tensors: list[Tensor]) -> str:
    """The HLO module of these pending tensors (a graph's outputs, then the state it updated),
    lowered without compiling. Lowering applies pending view updates of the state, which changes
    the IR a later sync compiles: read the HLO of a trace that is then dropped, not of one to run.
    """
    torch_xla, _ = _torch_xla()
    return torch_xla._XLAC._get_xla_tensors_hlo(tensors)


def initialize_persistent_cache(path: Path, readonly: bool) -> bool:
    """Point torch-xla's persistent compilation cache at `path`; False if that is no longer possible.

    torch-xla fixes the cache when it compiles its first graph in a process, so this must come
    before any XLA computation. It stays possible afterwards only if the process already uses `path`.
    """
    torch_xla, _ = _torch_xla()
    import torch_xla.runtime as xr

    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        return os.environ.get("XLA_PERSISTENT_CACHE_PATH") == str(path)
    xr.initialize_cache(str(path), readonly=readonly)
    return True
