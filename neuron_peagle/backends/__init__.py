"""Backends turn a graph module into something callable on a device; the one seam for devices.

- `eager`: plain PyTorch on CPU. The reference, and the fast CPU path.
- `xla`: torch-xla (PJRT CPU here, PJRT NEURON on a trn instance). Each distinct graph is traced and
  compiled once, then reused; compilations are counted.
- `neuron`: neuronx-distributed on torch-neuronx: the graphs of an engine are the keys of one
  NxDModel built ahead of time (`python -m compile.build --backend neuron`) and loaded by
  `Engine.from_compiled`, sharing one device copy of the weights and state. Imported lazily;
  without the Neuron SDK it raises a clear error.
"""

from __future__ import annotations

from neuron_peagle.backends.base import Backend
from neuron_peagle.errors import ConfigError


def get_backend(name: str) -> Backend:
    if name == "eager":
        from neuron_peagle.backends.eager import EagerBackend

        return EagerBackend()
    if name == "xla":
        from neuron_peagle.backends.xla import XlaBackend

        return XlaBackend()
    if name == "neuron":
        from neuron_peagle.backends.neuron import NeuronBackend

        return NeuronBackend()
    raise ConfigError(f"unknown backend {name!r} (choose eager, xla or neuron)")


__all__ = ["Backend", "get_backend"]
