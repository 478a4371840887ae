"""What each backend is and does, as the code outside `backends/` needs to know it: one `Capabilities`
record per backend name in `BACKENDS`, so nothing compares a backend's name. Importing it imports no device
stack."""

from __future__ import annotations

from dataclasses import dataclass

from neuron_peagle import checks
from neuron_peagle.errors import ConfigError
from neuron_peagle.lnc import check_lnc, environment_lnc, runtime_lnc


@dataclass(frozen=True)
class Capabilities:
    """What a backend is and does, as the code outside `backends/` needs to know it (the backend's own
    code carries the rest). One record per backend in `BACKENDS`; nothing compares a backend's name."""

    help: str  # one line of --help and of the README
    compiles: bool  # graphs are compiled before they run: warm them before decoding
    times_step_parts: bool  # a speculative step can be timed part by part from the host (nothing compiled)
    shards_at_run_time: bool  # the parallel plan applied inside the engine, one process per rank (torchrun)
    shards_ahead_of_time: bool  # compile.build makes tensor-parallel artifacts for it (--tp-degree)
    needs_artifacts: bool  # graphs come only from artifacts built by compile.build
    builds_artifacts: bool  # compile.build can build artifacts for it
    on_neuron_cores: bool  # the Neuron runtime runs it: its device profiles, not torch.profiler
    default_kernels: str  # what kernels="auto" means: NKI on NeuronCores, plain PyTorch elsewhere
    interprets_kernels: bool  # can run kernels="interpreter" (the kernel source on CPU tensors, op by op)
    process_group_device: str  # torch.distributed device type of its ranks
    packages: tuple[str, ...]  # the packages a compiled graph of it is tied to (recorded in manifests)
    # where lnc="auto" comes from: "runtime" (the Neuron runtime of this process: TorchNeuron compiles for
    # it), "environment" (NEURON_LOGICAL_NC_CONFIG if set, else 1: nxd passes it to the compiler), or
    # "none" (1: no NeuronCore)
    lnc_source: str = "none"
    # whether the host loop reads step n on a reader thread while step n+1 runs (runtime.host_loop, overlap):
    # "on" by default (a NeuronCore runs the step by itself while the host reads), "allowed" (CPU: the reader
    # shares the cores and the GIL with the step, and a bf16 step's host share is 1-2%: measured
    # slower, BENCHMARKS.md), "off" (torch-xla's lazy tensors, whose tracing state is per thread: untried)
    host_overlap: str = "off"
    # whether a speculative engine at batch 1 also compiles the short K and K = 0 by default and chooses K per
    # step by cost, as it does above batch 1: where a step's time grows with its rows even at batch 1 (CPU
    # cores: in bf16 a K=7 verify costs 1.7x a plain step, BENCHMARKS.md), not where a verify of K+1 rows
    # reads the same weights as a plain step and costs about as much (NeuronCores, trn1 under torch-xla)
    k_choice_at_batch_1: bool = False

    def lnc_for(self, lnc: int | str) -> int:
        """The logical NeuronCore degree a build asking for `lnc` gets on this backend (neuron_peagle.lnc)."""
        if lnc != "auto":
            degree = check_lnc(lnc)
            if degree != 1 and self.lnc_source == "none":
                raise ConfigError(f"lnc={degree} needs NeuronCores: only with backend "
                                  + " or ".join(repr(n) for n in backends_that("on_neuron_cores")))
            return degree
        if self.lnc_source == "runtime":
            return runtime_lnc()
        if self.lnc_source == "environment":
            return environment_lnc() or 1
        return 1

    def kernels_for(self, kernels: str) -> str:
        """The draft-pass kernels a build asking for `kernels` gets on this backend."""
        if kernels == "auto":
            return self.default_kernels
        if kernels == "interpreter" and not self.interprets_kernels:
            raise ConfigError("kernels='interpreter' runs the kernel source on CPU tensors: only with backend "
                              + " or ".join(repr(n) for n in backends_that("interprets_kernels")))
        return kernels


_CPU = dict(on_neuron_cores=False, default_kernels="reference", process_group_device="cpu")
_NEURON = dict(on_neuron_cores=True, default_kernels="nki", interprets_kernels=False, times_step_parts=False,
               compiles=True, builds_artifacts=True)
BACKENDS: dict[str, Capabilities] = {
    # Main environment (torch 2.14, TorchNeuron's PyTorch).
    "eager": Capabilities(
        "PyTorch op by op on CPU: the reference", compiles=False, times_step_parts=True, shards_at_run_time=True,
        shards_ahead_of_time=False, needs_artifacts=False, builds_artifacts=False, interprets_kernels=True,
        packages=("torch",), host_overlap="allowed", k_choice_at_batch_1=True, **_CPU),
    "inductor": Capabilities(
        "torch.compile + inductor on CPU (fullgraph, fixed shapes): the fast CPU path", compiles=True,
        times_step_parts=False, shards_at_run_time=True, shards_ahead_of_time=False, needs_artifacts=False,
        builds_artifacts=True, interprets_kernels=False, packages=("torch",), host_overlap="allowed",
        k_choice_at_batch_1=True, **_CPU),
    "neuron": Capabilities(
        "torch.compile + TorchNeuron on trn2/trn3 (torch-neuronx 2.14)", shards_at_run_time=True,
        shards_ahead_of_time=False, needs_artifacts=False, process_group_device="neuron",
        packages=("torch", "torch-neuronx", "neuronx-cc", "nki"), lnc_source="runtime", host_overlap="on",
        **_NEURON),
    # The torch-xla environment (torch 2.9.1 + torch-xla 2.9.0, Neuron 2.31; `make setup-xla`).
    "xla": Capabilities(
        "torch-xla 2.9 lazy HLO (PJRT CPU, or trn1 through torch-neuronx 2.9); torch-xla environment",
        compiles=True, times_step_parts=False, shards_at_run_time=False, shards_ahead_of_time=False,
        needs_artifacts=False, builds_artifacts=True, interprets_kernels=False, packages=("torch", "torch-xla"),
        **_CPU),
    # neuron and nxd graphs call the NKI kernels (kernels "auto" is nki there), so nki is among their packages.
    "nxd": Capabilities(
        "neuronx-distributed NEFFs built ahead of time (trn1/trn2, Neuron 2.31); torch-xla environment",
        shards_at_run_time=False, shards_ahead_of_time=True, needs_artifacts=True, process_group_device="cpu",
        packages=("torch", "torch-xla", "torch-neuronx", "neuronx-cc", "neuronx-distributed", "nki"),
        lnc_source="environment", **_NEURON),
}
KERNEL_MODES = ("reference", "nki", "interpreter")  # see neuron_peagle.kernels
# The command line's backend: the fastest exact path measured on CPU (BENCHMARKS.md, "Compiled graphs").
DEFAULT_BACKEND = "inductor"


def capabilities_of(backend: str) -> Capabilities:
    """The record of the backend called `backend` (no device stack is imported)."""
    return BACKENDS[checks.choice("backend", backend, tuple(BACKENDS))]


def backends_that(capability: str) -> tuple[str, ...]:
    """The backends with `capability` (a boolean field of Capabilities), for choices and messages."""
    return tuple(name for name, caps in BACKENDS.items() if getattr(caps, capability))
