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
from neuron_peagle.capabilities import capabilities_of


def get_backend(name: str, tp_degree: int = 1) -> Backend:
    """The backend called `name` (capabilities.BACKENDS); `tp_degree`: the ranks of a backend that shards ahead
    of time (nxd) its graphs are for."""
    capabilities_of(name)  # an unknown name: one message listing the backends
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
    from neuron_peagle.backends.nxd import NxdBackend

    return NxdBackend(tp_degree)


__all__ = ["Backend", "get_backend"]
