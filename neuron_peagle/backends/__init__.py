"""Backends turn a graph module into something callable on a device; the one seam for devices.

Main environment (torch 2.14, TorchNeuron's PyTorch):
- `eager`: plain PyTorch on CPU, op by op. The reference every other backend is tested against.
- `inductor`: torch.compile(fullgraph=True, dynamic=False) with inductor: the graphs compiled into
  C++/OpenMP kernels. The fast CPU path, and the same capture TorchNeuron compiles.
- `neuron`: torch.compile with TorchNeuron's `neuron` backend on trn2/trn3 (torch-neuronx 2.14).
trn1 environment (torch 2.9.1 + torch-xla 2.9.0, Neuron 2.31; `make setup-xla`):
- `xla`: torch-xla, lazily traced HLO, compiled once per graph (PJRT CPU here, PJRT NEURON on trn1).
- `nxd`: neuronx-distributed's NxDModel of NEFFs built ahead of time (`python -m compile.build
  --backend nxd`), loaded by `Engine.from_compiled`.
Every device import is lazy; a backend whose stack is missing raises BackendUnavailableError saying
what to install.
"""

from __future__ import annotations

from neuron_peagle.backends.base import Backend
from neuron_peagle.errors import ConfigError

# name -> one line of --help and README
BACKEND_HELP = {
    "eager": "PyTorch op by op on CPU: the reference",
    "inductor": "torch.compile + inductor on CPU (fullgraph, fixed shapes): the fast CPU path",
    "neuron": "torch.compile + TorchNeuron on trn2/trn3 (torch-neuronx 2.14)",
    "xla": "torch-xla 2.9 lazy HLO (PJRT CPU, or trn1 through torch-neuronx 2.9); torch-xla environment",
    "nxd": "neuronx-distributed NEFFs built ahead of time (trn1/trn2, Neuron 2.31); torch-xla environment",
}
# Backends that turn graphs into compiled code through torch.compile.
COMPILE_BACKENDS = ("inductor", "neuron")
# Backends that run on NeuronCores (NKI kernels, the Neuron runtime's device profiles).
NEURON_BACKENDS = ("neuron", "nxd")


def get_backend(name: str) -> Backend:
    """The backend called `name` (see BACKEND_HELP)."""
    if name == "eager":
        from neuron_peagle.backends.eager import EagerBackend

        return EagerBackend()
    if name == "inductor":
        from neuron_peagle.backends.compiled import inductor_backend

        return inductor_backend()
    if name == "neuron":
        from neuron_peagle.backends.compiled import neuron_backend

        return neuron_backend()
    if name == "xla":
        from neuron_peagle.backends.xla import XlaBackend

        return XlaBackend()
    if name == "nxd":
        from neuron_peagle.backends.nxd import NxdBackend

        return NxdBackend()
    raise ConfigError(f"unknown backend {name!r} (choose one of {', '.join(BACKEND_HELP)})")


__all__ = ["BACKEND_HELP", "COMPILE_BACKENDS", "NEURON_BACKENDS", "Backend", "get_backend"]
