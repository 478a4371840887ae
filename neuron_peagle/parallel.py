"""Tensor parallelism of the target model: which shard of each weight a rank holds, and the sum that
joins the shards.

Megatron-style, as neuronx-distributed lays out Llama: the fused q/k/v and gate/up projections are
split by output (whole attention heads, whole KV heads, a slice of the MLP's intermediate width), so
attention and the SwiGLU run locally on a rank's heads; the o and down projections are split by
input, and their partial outputs are summed across ranks before the bias and the residual. Embedding,
norms, LM head and the drafter stay whole on every rank (after each sum every rank holds the same
hidden states, so every rank computes the same tokens and the host loops stay in step). A rank's KV
cache holds only its KV heads.

On the eager backend the sum is a `torch.distributed` all-reduce over the default process group (one
process per rank: `torchrun --nproc-per-node N`, gloo on CPU). Partial sums are reduced in float32,
so a bf16 model rounds once, after the sum, as it does unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from neuron_peagle.errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    degree: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.degree < 1:
            raise ConfigError(f"tp_degree must be >= 1, got {self.degree}")
        if not 0 <= self.rank < self.degree:
            raise ConfigError(f"tensor-parallel rank {self.rank} is outside [0, {self.degree})")

    def local(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, KV heads, intermediate width); it must divide evenly."""
        if total % self.degree:
            raise ConfigError(f"the target's {what} ({total}) is not divisible by tp_degree {self.degree}")
        return total // self.degree

    @classmethod
    def from_process_group(cls, degree: int) -> "TensorParallel":
        """The rank of this process in the default process group, which must have `degree` processes.
        Under torchrun (its environment variables set) the group is created here if it is not yet."""
        if degree == 1:
            return SINGLE
        cls(degree)  # checks the degree before any process group is touched
        import torch.distributed as dist

        if not dist.is_available():
            raise ConfigError("tensor parallelism needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                raise ConfigError(f"tp_degree {degree} needs one process per rank: run under "
                                  f"`torchrun --nproc-per-node {degree}` or initialize torch.distributed first")
            dist.init_process_group("gloo")
        if dist.get_world_size() != degree:
            raise ConfigError(f"tp_degree {degree} needs a process group of {degree} processes, "
                              f"this one has {dist.get_world_size()}")
        return cls(degree, dist.get_rank())


SINGLE = TensorParallel()  # no tensor parallelism: one rank holds everything


def all_reduce_sum(x: Tensor, tp: TensorParallel) -> Tensor:
    """The sum of every rank's `x` (same shape on all), in x's dtype; x itself where degree is 1."""
    if tp.degree == 1:
        return x
    import torch.distributed as dist

    total = x.to(torch.float32, copy=True)  # the all-reduce writes into it
    dist.all_reduce(total)
    return total.to(x.dtype)
