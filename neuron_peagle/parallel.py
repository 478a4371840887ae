"""Tensor parallelism of the target model with PyTorch's own engine, `torch.distributed.tensor.parallel`.

Megatron-style, as neuronx-distributed lays out Llama: in every decoder layer the fused q/k/v and
gate/up projections are split by output (`ColwiseParallel`: whole attention heads, whole KV heads, a
slice of the MLP's width), so attention and the SwiGLU run on a rank's own heads; the o and down
projections are split by input (`RowwiseParallel`), and their partial outputs are summed across ranks
(an all-reduce) before the residual. Embedding, norms, LM head and the drafter stay whole on every
rank, so after each sum every rank holds the same hidden states and computes the same tokens, and
the host loops stay in step. A rank's KV cache holds only its KV heads. Where there are fewer KV heads
than ranks (the degree a multiple of them), each KV head is replicated on the ranks whose query heads
read it.

The sharded projections are `nn.Linear` modules ([out, in], the layout the parallel styles shard),
built whole on every rank with their rows in rank order (rank 0's q, k, v rows, then rank 1's, ...;
rank 0's gate and up rows, then rank 1's) so that an even split by output gives each rank its own
heads; `parallelize` then keeps each rank's shard as a DTensor. The same code runs in eager and inside
torch.compile'd graphs (dynamo traces DTensor into functional collectives), on the gloo process group
on CPU and the Neuron device's on trn2/trn3: one process per rank, under `torchrun`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from neuron_peagle.errors import ConfigError

# Which parallel style each sharded projection of a decoder layer gets.
LAYER_PLAN = {"self_attn.qkv_proj": "colwise", "mlp.gate_up_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.down_proj": "rowwise"}


@dataclass(frozen=True)
class TensorParallel:
    degree: int = 1
    rank: int = 0
    device_type: str = "cpu"  # of the device mesh: "cpu" (gloo) or "neuron"

    def __post_init__(self) -> None:
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ConfigError(f"tp_degree must be >= 1, got {self.degree}")
        if not 0 <= self.rank < self.degree:
            raise ConfigError(f"tensor-parallel rank {self.rank} is outside [0, {self.degree})")

    def local(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, intermediate width); it must divide evenly."""
        if total % self.degree:
            raise ConfigError(f"the target's {what} ({total}) is not divisible by tp_degree {self.degree}")
        return total // self.degree

    def kv_heads(self, num_kv_heads: int) -> range:
        """The KV heads (global indices) this rank holds: an even share, or, where the degree is a
        multiple of their number, the one KV head its query heads read (replicated)."""
        if num_kv_heads % self.degree == 0:
            share = num_kv_heads // self.degree
            return range(self.rank * share, (self.rank + 1) * share)
        if self.degree % num_kv_heads == 0:
            head = self.rank // (self.degree // num_kv_heads)
            return range(head, head + 1)
        raise ConfigError(f"the target's key-value heads ({num_kv_heads}) neither divide by tp_degree {self.degree} "
                          "nor divide it (to be replicated)")

    def check(self, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """Every split this degree needs is possible (checked before anything is loaded)."""
        self.local(num_heads, "attention heads")
        self.kv_heads(num_kv_heads)
        self.local(intermediate_size, "intermediate size")

    def rank_order(self, parts: list[Tensor], shares: list[list[range]]) -> Tensor:
        """Rows of `parts` (each [rows, ...]) regrouped rank by rank: for each rank, part i's rows in
        `shares[i][rank]` (in row units), concatenated; what an even split by rows hands each rank."""
        return torch.cat([part[share[rank].start:share[rank].stop] for rank in range(self.degree)
                          for part, share in zip(parts, shares)])

    def for_rank(self, rank: int) -> "TensorParallel":
        return TensorParallel(self.degree, rank, self.device_type)

    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, (self.degree,))

    def parallelize(self, layer: nn.Module) -> None:
        """Shard a decoder layer's projections (built whole, rows in rank order) over the mesh."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(layer, self.mesh(), {name: styles[style]() for name, style in LAYER_PLAN.items()})

    @classmethod
    def from_process_group(cls, degree: int, device_type: str = "cpu") -> "TensorParallel":
        """The rank of this process in the default process group, which must have `degree` processes.
        Under torchrun (its environment variables set) the group is created here if it is not yet:
        gloo on CPU, the device's own backend elsewhere."""
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
            dist.init_process_group("gloo" if device_type == "cpu" else None)
        if dist.get_world_size() != degree:
            raise ConfigError(f"tp_degree {degree} needs a process group of {degree} processes, "
                              f"this one has {dist.get_world_size()}")
        return cls(degree, dist.get_rank(), device_type)


SINGLE = TensorParallel()  # no tensor parallelism: one rank holds everything


def shutdown() -> None:
    """Leave the process group together (a barrier, then destroy it), so that no rank exits while
    another's collective threads still run (gloo aborts a process torn down mid-collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End this rank's process with `code` once its output is flushed, skipping interpreter teardown:
    the destructors of the collective library's threads can abort a process that has finished
    (`terminate called without an active exception`, seen in about 1 of 30 three-rank runs on CPU)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
