"""The backend interface: move a graph's weights and state to a device, run it, count compilations."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

Outputs = TypeVar("Outputs", bound=tuple)


class Backend(Protocol):
    name: str
    device: torch.device

    def prepare(self, module: nn.Module) -> nn.Module:
        """Place a module's parameters and buffers (weights, caches) on the device, once."""

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]) -> Outputs:
        """Run one graph on host inputs; return its outputs as host tensors, state updated."""

    def compile_count(self) -> int:
        """Graphs compiled so far in this process (0 for a backend that does not compile)."""
