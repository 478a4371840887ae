"""The parallel plan: how the target is split over ranks, in one place, applied to the model once it is
built (on the meta device, `TargetModel.on_meta`) and before any weight is read; the model code then
sees a rank's head counts, widths and experts only, and the loader reads only a rank's slices
(`LayerShard`).

Dense layers: the Megatron layout (PyTorch's ColwiseParallel / RowwiseParallel, neuronx-distributed's
ColumnParallelLinear / RowParallelLinear). The fused q/k/v and gate/up projections are split by output:
a rank computes whole attention heads, its KV heads and a slice of the MLP's width; the o and down
projections are split by input, and their partial outputs are summed across ranks before the residual
(`AllReduce`, in float32). Where there are fewer KV heads than ranks (the degree a multiple of them),
each KV head is replicated on the ranks whose query heads read it. gpt-oss's sinks follow their heads.

Mixture-of-experts layers: attention as above; the experts by expert parallelism. Rank r holds experts
[r * E/N, (r+1) * E/N), whole (both matrices and biases). The router is replicated: every rank scores
all E and routes every token; a rank computes the routes to its experts (the others keep their slot with
score 0: no shape depends on the routing, no token moves between ranks) and one all-reduce sums the
partial outputs. A rank reads E/N of the expert weights, the bulk of an MoE model.

Embedding, norms, LM head and the drafter stay whole on every rank, so after each sum every rank holds
the same hidden states and computes the same tokens, and the host loops stay in step. One process per
rank, under `torchrun`; the sums are torch.distributed's functional all-reduce, which eager runs and
dynamo traces into the compiled graph (gloo on CPU, the Neuron device's process group on trn2/trn3).
trn1's nxd backend maps the same layout onto NxD's parallel layers (backends/nxd_parallel.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from neuron_peagle.config import ModelConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.layers import LayerConfig, LayerShard
from neuron_peagle.models.weights import head_rows

# The package that registers a device type's process-group backend (TorchNeuron: the "neuron" backend).
DEVICE_PACKAGES = {"neuron": "torch_neuronx"}
# Which parallel style each sharded projection of a dense decoder layer gets.
LAYER_PLAN = {"self_attn.qkv_proj": "colwise", "mlp.gate_up_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.down_proj": "rowwise"}


@dataclass(frozen=True)
class TensorParallel:
    degree: int = 1
    rank: int = 0
    device_type: str = "cpu"  # of the process group: "cpu" (gloo) or "neuron"

    def __post_init__(self) -> None:
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ConfigError(f"tp_degree must be >= 1, got {self.degree}")
        if not 0 <= self.rank < self.degree:
            raise ConfigError(f"tensor-parallel rank {self.rank} is outside [0, {self.degree})")

    def local(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, intermediate width, experts); it must divide evenly."""
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

    def check(self, config: ModelConfig) -> None:
        """Every split this degree needs is possible for the target (checked before anything is read)."""
        self.local(config.num_attention_heads, "attention heads")
        self.kv_heads(config.num_key_value_heads)
        moe = config.moe
        if moe is None or not all(moe.sparse_layers):
            self.local(config.intermediate_size, "intermediate size")
        if moe is not None:
            if self.degree > moe.num_experts:
                raise ConfigError(f"expert parallelism over {self.degree} ranks needs at least one expert per "
                                  f"rank; the target has {moe.num_experts} experts")
            self.local(moe.num_experts, "experts")

    def rank_order(self, parts: list[Tensor], shares: list[list[range]]) -> Tensor:
        """Rows of `parts` (each [rows, ...]) regrouped rank by rank: for each rank, part i's rows in
        `shares[i][rank]` (in row units), concatenated; what an even split by rows hands each rank."""
        return torch.cat([part[share[rank].start:share[rank].stop] for rank in range(self.degree)
                          for part, share in zip(parts, shares)])

    def for_rank(self, rank: int) -> "TensorParallel":
        return TensorParallel(self.degree, rank, self.device_type)

    def layer_shard(self, config: LayerConfig) -> LayerShard:
        """What of a decoder layer's checkpoint tensors this rank holds."""
        if self.degree == 1:
            return LayerShard.whole(config)
        r = self.rank
        heads = self.local(config.num_heads, "attention heads")
        width = self.local(config.intermediate_size, "intermediate size") if config.moe is None else 0
        experts = self.local(config.moe.num_experts, "experts") if config.moe is not None else 0
        return LayerShard(range(r * heads, (r + 1) * heads), self.kv_heads(config.num_kv_heads),
                          range(r * width, (r + 1) * width), range(r * experts, (r + 1) * experts),
                          adds_summed_biases=r == 0)

    def rank_rows(self, config: LayerConfig) -> tuple[list[range], list[range], list[range]]:
        """Per rank, the rows of q, of k (and of v) and of gate (and of up) it holds, in each matrix's own
        rows ([out, in]) (`layer_shard`): what `rank_order` regroups."""
        shards = [self.for_rank(r).layer_shard(config) for r in range(self.degree)]
        hd = config.head_dim
        return ([head_rows(s.heads, hd) for s in shards], [head_rows(s.kv_heads, hd) for s in shards],
                [s.width for s in shards])

    def shard(self, model: nn.Module) -> None:
        """Apply the plan to a target built on the meta device (`TargetModel.on_meta`): each decoder layer
        takes this rank's share (`localize`) and sums its partial outputs across ranks (`AllReduce`)."""
        if self.degree == 1:
            return
        self.check(model.config)
        for layer in model.layers:
            localize(layer, self.layer_shard(layer.config))
            layer.self_attn.sum_ranks = AllReduce()
            layer.mlp.sum_ranks = AllReduce()

    @classmethod
    def from_process_group(cls, degree: int, device_type: str = "cpu") -> "TensorParallel":
        """The rank of this process in the default process group, which must have `degree` processes.
        Under torchrun (its environment variables set) the group is created here if it is not yet:
        gloo on CPU, TorchNeuron's "neuron" backend on its device (named, as its docs do)."""
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
            package = DEVICE_PACKAGES.get(device_type)
            if package is not None:  # it registers the device's process-group backend when imported
                try:
                    importlib.import_module(package)
                except ImportError:
                    raise ConfigError(f"tensor parallelism on the {device_type} device needs {package} installed: "
                                      "see docs/trainium.md") from None
            dist.init_process_group("gloo" if device_type == "cpu" else device_type)
        if dist.get_world_size() != degree:
            raise ConfigError(f"tp_degree {degree} needs a process group of {degree} processes, "
                              f"this one has {dist.get_world_size()}")
        return cls(degree, dist.get_rank(), device_type)


SINGLE = TensorParallel()  # no tensor parallelism: one rank holds everything


def agree_on_max(values: list[float], tp: TensorParallel) -> list[float]:
    """The largest of each value over the ranks (host numbers every rank must decide alike on, such as
    measured step times: runtime/k_choice.py); the values themselves with one rank."""
    if tp.degree == 1:
        return list(values)
    import torch.distributed as dist

    device = "cpu" if tp.device_type == "cpu" else torch.device(tp.device_type)
    agreed = torch.tensor(values, dtype=torch.float64 if tp.device_type == "cpu" else torch.float32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed.cpu().tolist()


def localize(layer: nn.Module, shard: LayerShard) -> None:
    """Give a decoder layer built on the meta device (whole) the share `shard` of it: head counts, MLP
    width, experts, and its projections' shapes; the loader then reads the slices `layer.shard` names."""
    attn, mlp = layer.self_attn, layer.mlp
    if not attn.qkv_proj.weight.is_meta:
        raise ConfigError("the parallel plan applies to a model built on the meta device, before its weights "
                          "are read (TargetModel.on_meta)")
    layer.shard = shard
    attn.num_heads, attn.num_kv_heads = len(shard.heads), len(shard.kv_heads)
    hd = attn.head_dim
    _resize(attn.qkv_proj, 0, (attn.num_heads + 2 * attn.num_kv_heads) * hd)
    _resize(attn.o_proj, 1, attn.num_heads * hd)
    if attn.sinks is not None:
        attn.sinks = _meta_like(attn.sinks, (attn.num_heads,))
    experts = getattr(mlp, "experts", None)
    if experts is None:
        mlp.intermediate_size = len(shard.width)
        _resize(mlp.gate_up_proj, 0, 2 * mlp.intermediate_size)
        _resize(mlp.down_proj, 1, mlp.intermediate_size)
        return
    experts.held = shard.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, _meta_like(param, (len(shard.experts), *param.shape[1:])))


def _meta_like(param: Tensor, shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"), requires_grad=False)


def _resize(linear: nn.Linear, dim: int, size: int) -> None:
    """A linear layer's weight [out, in] with `size` along `dim` (0: outputs, with its bias; 1: inputs)."""
    shape = list(linear.weight.shape)
    shape[dim] = size
    linear.weight = _meta_like(linear.weight, tuple(shape))
    linear.out_features, linear.in_features = shape
    if dim == 0 and linear.bias is not None:
        linear.bias = _meta_like(linear.bias, (size,))


class AllReduce(nn.Module):
    """The sum over the ranks, in float32, returned in the input's dtype: by default torch.distributed's
    functional all-reduce over the default process group (one node of the compiled graph); `reduce` puts
    another collective in its place (NxD's, on trn1: backends/nxd_parallel.py)."""

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.reduce = reduce if reduce is not None else _sum_over_world

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(x.float()).to(x.dtype)


def _sum_over_world(x: Tensor) -> Tensor:
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(x, "sum", dist.group.WORLD)


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
