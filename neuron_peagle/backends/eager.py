"""Eager PyTorch on CPU: the reference path, and the fast path where no device is present."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EagerBackend:
    name = "eager"
    device = torch.device("cpu")

    def prepare(self, module: nn.Module) -> nn.Module:
        return module

    def run(self, graph: nn.Module, inputs: tuple[Tensor, ...]):
        with torch.inference_mode():
            return graph(*inputs)

    def compile_count(self) -> int:
        return 0
