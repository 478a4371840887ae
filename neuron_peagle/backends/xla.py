"""torch-xla: the graph is traced lazily, cut at `torch_xla.sync()`, compiled once per distinct HLO.

On CPU (PJRT_DEVICE=CPU) this lowers to the same HLO that neuronx-cc compiles on a trn instance, and
its compile counter proves that generation runs on a fixed set of graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuron_peagle.errors import BackendUnavailableError


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.debug.metrics as metrics
    except ImportError as err:  # pragma: no cover - torch-xla is a pinned dependency
        raise BackendUnavailableError(f"the xla backend needs torch-xla==2.9.0 ({err})") from None
    return torch_xla, metrics


class XlaBackend:
    name = "xla"

    def __init__(self) -> None:
        self._xla, self._metrics = _torch_xla()
        self.device = self._xla.device()

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        self._xla.sync()
        return module

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        with torch.no_grad():
            outputs = graph(*(t.to(self.device) for t in inputs))
            # One sync = one graph: the outputs and every in-place state update (the caches).
            self._xla.sync()
            return type(outputs)(*(t.cpu() for t in outputs))

    def compile_count(self) -> int:
        return int(self._metrics.counter_value("UncachedCompile") or 0)
