"""The backend interface: move a graph's weights and state to a device, run it, count compilations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

Outputs = TypeVar("Outputs", bound=tuple)
Shapes = tuple[tuple[int, ...], ...]


def shapes_of(inputs: Sequence[Tensor]) -> Shapes:
    """The shapes of a graph call's inputs: with the graph, what picks its compiled form."""
    return tuple(tuple(t.shape) for t in inputs)


class Backend(Protocol):
    name: str
    device: torch.device

    def prepare(self, module: nn.Module, rows_per_call: int = 1) -> nn.Module:
        """Place a module's parameters and buffers (weights, caches) on the device, once. rows_per_call:
        the rows a decode-time matmul of its graphs multiplies (batch x tokens per step), by which a
        backend may choose how the weights sit in memory (`layout.py`)."""

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]) -> Outputs:
        """Run one graph on host inputs; return its outputs as host tensors, state updated."""

    def compile_count(self) -> int:
        """Graphs compiled so far in this process (0 for a backend that does not compile)."""
