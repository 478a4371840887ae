"""torch.compile backends: `inductor` on CPU, `neuron` (TorchNeuron) on trn2/trn3. One code path.

Every graph is compiled with `fullgraph=True` (a graph break is an error, as TorchNeuron requires)
and `dynamic=False` (TorchNeuron rejects dynamic shapes), once per input signature: a prefill graph
once per bucket, each step graph once. The only difference between the two backends is the
`torch.compile` backend string and the device the weights and state live on.

Why one compiled callable per (graph, input shapes): dynamo keeps its compiled code per Python code
object, and the engine's graphs share classes (the greedy and sampling step graphs, every prefill
bucket), so compiling their forwards directly would make the second of each a *recompilation* of the
first and run into dynamo's recompile limit. Each callable here gets a code object of its own, so
each graph compiles exactly once and any recompilation is a bug; it is raised as an error
(`torch._dynamo.config.error_on_recompile`), which the tests rely on.

State (KV caches, speculative state, lookup history) is the modules' buffers, mutated in place by
the graphs; dynamo functionalizes the mutations and writes them back into the same buffers, so state
stays on the device between calls and the host only sees each graph's outputs.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.backends.base import Shapes, held_modules, shapes_of
from neuron_peagle.backends.compiled_artifacts import (INDUCTOR_CACHE, NEURON_CACHE, CompilerCache, build_compiled,
                                                       load_compiled, use_compiled_artifacts)
from neuron_peagle.capabilities import BACKENDS
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.state_writes import StateWrites, use_state_writes

NEURON_INSTALL_HINT = (
    "the neuron backend is TorchNeuron (torch-neuronx 2.14 with torch 2.14, Neuron SDK 2.33 or newer, "
    "trn2/trn3), installed from the Neuron SDK's own pip repository on a trn instance; on trn1 use the "
    "xla/nxd backends in the torch-xla environment (make setup-xla), and on other machines "
    "--backend inductor or eager"
)


def _fresh_entry(graph: nn.Module, tag: str) -> Callable:
    """`graph(*inputs)` as a function whose code object belongs to it alone (see module docstring)."""

    def call(*inputs: Tensor):
        return graph(*inputs)

    return types.FunctionType(call.__code__.replace(co_name=f"peagle_{tag}"), call.__globals__, f"peagle_{tag}",
                              None, call.__closure__)


class CompiledBackend:
    """Runs graphs through `torch.compile(..., backend=compiler, fullgraph=True, dynamic=False)`."""

    def __init__(self, name: str, device: torch.device, cache: CompilerCache, progress: bool = True,
                 options: dict[str, object] | None = None) -> None:
        self.name = name
        self.options = dict(options or {})  # the compiler's own options (torch.compile(options=...))
        self.capabilities = BACKENDS[name]
        self.device = device
        self.cache = cache
        # A line on stderr per graph compiled: a compile takes seconds to minutes, never silently.
        self.progress = progress
        self._compiled: dict[tuple[int, Shapes], Callable] = {}
        self._cache_note = "no artifacts"

    def prepare(self, graphs: Sequence[nn.Module]) -> None:
        """The modules on the device; on CPU, the weights with their fast strides (`layout.py`; on a
        NeuronCore the compiler lays them out)."""
        held = held_modules(graphs).to(self.device)
        use_state_writes(held, StateWrites.IN_PLACE)  # functionalized by dynamo, written back in place
        if self.capabilities.lnc_source == "runtime":
            check_kernels_lnc(held)
        if self.device.type == "cpu":
            from neuron_peagle.backends.cpu_modules import prepare_cpu_modules

            prepare_cpu_modules(held, graphs)

    def run(self, graph: nn.Module, inputs: NamedTuple):
        key = (id(graph), shapes_of(inputs))
        fn = self._compiled.get(key)
        fresh = fn is None
        if fresh:
            tag = f"{type(graph).__name__}_{len(self._compiled)}"
            fn = torch.compile(_fresh_entry(graph, tag), backend=self.name, fullgraph=True, dynamic=False,
                               options=self.options or None)
            label = f"{type(graph).__name__} for inputs {[list(s) for s in key[1]]}"
            if self.progress:
                print(f"[{self.name}: compiling {label} (or loading it from the compile cache) ...]", file=sys.stderr, flush=True)
            start = time.perf_counter()
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            outputs = fn(*(_fresh(t, self.device) for t in inputs))
        if fresh:
            self._compiled[key] = fn  # only once it compiled and ran
            seconds = time.perf_counter() - start
            if self.progress:
                print(f"[{self.name}: {label} ready in {seconds:.1f} s]", file=sys.stderr, flush=True)
        return graph.Outputs(*(t.cpu() for t in outputs))

    def compile_count(self) -> int:
        """Graphs this backend has compiled (one per graph and input shapes)."""
        return len(self._compiled)

    def use_artifacts(self, directory: Path, writable: bool) -> str:
        self._cache_note = use_compiled_artifacts(self.cache, directory, writable)
        return self._cache_note

    def build_artifacts(self, plan, build):
        return build_compiled(self, self.cache, plan, build)

    def load_artifacts(self, directory: Path, plan, manifest):
        return load_compiled(self, self.cache, directory, plan, manifest, self._cache_note)

    def profiler(self, out_dir: Path, trace: bool):
        from neuron_peagle.backends.profilers import profiler_for

        return profiler_for(self.capabilities.on_neuron_cores, out_dir, trace)


def check_kernels_lnc(held: nn.Module) -> None:
    """The kernels launch at the LNC TorchNeuron compiles the graphs for (the runtime's), or the compiler
    would reject them (NCC_EVRF066): refused before anything compiles."""
    from neuron_peagle.lnc import LNC_ENV, runtime_lnc

    runtime = runtime_lnc()
    built = sorted({m.lnc for m in held.modules() if isinstance(getattr(m, "lnc", None), int)})
    if any(lnc != runtime for lnc in built):
        raise ConfigError(f"the graphs' kernels are built for lnc {built[0]}, the Neuron runtime here runs LNC "
                          f"{runtime}: build with --lnc {runtime}, or set {LNC_ENV}={built[0]} before the process starts")


def _fresh(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device` with the default strides: dynamo guards on strides, the runners may pass slices
    of one tensor, and `contiguous()` keeps odd strides on size-1 dimensions."""
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)


# Inductor's options beyond its defaults: none. bf16 speculative output equals plain bf16 decoding without
# emulating every cast (`emulate_precision_casts`, 9-11% of a P-EAGLE step): the one value whose rounding
# depended on how a graph was fused, the residual stream entering a norm, is rounded by the model itself
# (`models.layers.rounded_float`; tests/test_inductor.py; BENCHMARKS.md, "bf16 on inductor").
INDUCTOR_OPTIONS: dict[str, object] = {}


def inductor_backend(options: dict[str, object] | None = None) -> CompiledBackend:
    """`options`: inductor's (default INDUCTOR_OPTIONS)."""
    return CompiledBackend("inductor", torch.device("cpu"), INDUCTOR_CACHE,
                           options=INDUCTOR_OPTIONS if options is None else options)


def neuron_backend() -> CompiledBackend:
    """TorchNeuron: importing `torch_neuronx` registers the "neuron" device and torch.compile backend."""
    try:
        import torch_neuronx  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(NEURON_INSTALL_HINT) from None
    if not hasattr(torch, "neuron") and torch._C._get_privateuse1_backend_name() != "neuron":
        raise BackendUnavailableError(f"torch_neuronx imported but registered no 'neuron' device: the installed "
                                      f"torch-neuronx is not TorchNeuron; {NEURON_INSTALL_HINT}")
    return CompiledBackend("neuron", torch.device("neuron"), NEURON_CACHE)
