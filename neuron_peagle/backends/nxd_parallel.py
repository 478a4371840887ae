"""Tensor parallelism on the nxd backend (trn1, Neuron 2.31's torch-xla stack): the target's decoder
layers on neuronx-distributed's parallel layers, their weights sharded by NxD's own checkpoint sharding.

The layout is the parallel plan's (neuron_peagle/parallel.py: its LAYER_PLAN, its `rank_rows` and
`layer_shard`), in NxD's terms. In every decoder layer the fused q/k/v and gate/up projections become `ColumnParallelLinear(gather_output=
False)` (each rank computes its own attention heads, its KV heads and its slice of the MLP's width) and
the o and down projections `RowParallelLinear(input_is_parallel=True, reduce_dtype=torch.float32)`
(partial products summed across ranks in float32 before the residual). Embedding, norms, LM head and
the drafter stay whole on every rank. The graphs are traced once (SPMD) with each rank's shapes: the
attention sees `num_heads / N` heads, the target's KV cache holds a rank's KV heads.

Mixture-of-experts layers (Qwen3-MoE, gpt-oss): the attention as above; the experts by the plan's expert
parallelism, on our own expert code (exact against transformers) rather than NxD's MoE modules: rank r's
experts [r E/N, (r+1) E/N) whole, the router whole, the partial outputs summed by NxD's
`reduce_from_tensor_model_parallel_region` (in float32). A rank's experts and gpt-oss's sinks of its heads
differ per rank but not in shape, so the one SPMD trace holds rank 0's and each rank's weight dict its
own (`RankTensors`), the experts' first index included (`first_expert`, data, not a constant of the graph).

NxD's layers store [out, in] and `shard_checkpoint` splits a column-parallel tensor into N equal
blocks of rows (a row-parallel one into N blocks of columns), rank r taking block r. So the whole
tensor it is given has its rows in rank order: rank 0's q, k, v heads, then rank 1's, ...; rank 0's
gate and up rows, then rank 1's. Where there are fewer KV heads than ranks, each KV head is repeated
for the ranks whose query heads read it (`TensorParallel.kv_heads`, the mapping of `parallel.py`),
so such a tensor is taller than the checkpoint's. o and down are the checkpoint's matrices: an even
split of their columns gives each rank the inputs of its heads and of its MLP slice.

Build and load do the same, under NxD's parallel state (`parallel_state`: `NxDParallelState`, which
runs `parallel_state.initialize_model_parallel(tensor_model_parallel_size=N)` in a mock process group,
in AOT mode, as ModelBuilder sets it up):
1. `plan_projections`: which projection of which layer becomes which parallel layer, at NxD's sizes;
2. `shard_target`: swap them in (`nxd_layer`: NxD's classes), each rank's head counts and width, the
   target's KV cache remade with a rank's KV heads; `split_rank_tensors`: the experts and sinks;
3. `persist_tables`: every read-only buffer (rotary tables, datastore tables, the drafter's masks)
   made persistent, since `shard_checkpoint` drops every name that is not in `state_dict()`;
4. the weight dict: the bundle's, the swapped projections replaced by their whole tensors
   (`whole_projection`, rows in rank order), sharded per rank by `shard_checkpoint` (`rank_checkpoints`);
   the manifest records the whole dict's layout (`NxdTensorParallel.layout`).
Everything but NxD's classes and its sharding runs and is tested without the SDK (tests/test_nxd_parallel.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuron_peagle.backends.nxd_sdk import INSTALL_HINT, NxdApi, require_sdk
from neuron_peagle.errors import ArtifactError, BackendUnavailableError
from neuron_peagle.models.target import target_layer_config
from neuron_peagle.parallel import LAYER_PLAN, AllReduce, TensorParallel

COLUMN, ROW = "colwise", "rowwise"  # LAYER_PLAN's styles: ColumnParallelLinear, RowParallelLinear
KINDS = ("weight", "bias")


def parallel_state(degree: int) -> contextlib.AbstractContextManager:
    """NxD's parallel state for `degree` ranks while the model is built, traced and sharded; nothing for one."""
    if degree == 1:
        return contextlib.nullcontext()
    layers = require_sdk()
    return layers.NxDParallelState(world_size=degree, tensor_model_parallel_size=degree)


# ---- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectionPlan:
    """One projection of one decoder layer and the NxD layer that replaces it (NxD's whole sizes:
    `input_size` / `output_size` before the split; a column layer's output counts every rank's rows)."""

    layer: int
    kind: str  # a LAYER_PLAN key: "self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj"
    style: str  # COLUMN or ROW
    input_size: int
    output_size: int
    bias: bool
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """The projection's dotted name in the target model."""
        return f"layers.{self.layer}.{self.kind}"

    def whole_shape(self, kind: str) -> tuple[int, ...]:
        """Shape of the whole tensor `shard_checkpoint` splits: weight [out, in], bias [out]."""
        return (self.output_size, self.input_size) if kind == "weight" else (self.output_size,)

    def local_shape(self, kind: str, degree: int) -> tuple[int, ...]:
        """Shape of one rank's shard (a row layer's bias stays whole: it is added after the sum)."""
        if self.style == COLUMN:
            return (self.output_size // degree, self.input_size) if kind == "weight" else (self.output_size // degree,)
        return (self.output_size, self.input_size // degree) if kind == "weight" else (self.output_size,)


def plan_projections(target: nn.Module, tp: TensorParallel) -> list[ProjectionPlan]:
    """Every sharded projection of the target's decoder layers, in layer order (refuses a degree that
    does not divide the heads, KV heads or MLP width, before anything changes)."""
    c = target.config
    tp.check(c)
    hd, hidden = c.head_dim, c.hidden_size
    local_q = tp.local(c.num_attention_heads, "attention heads") * hd
    local_kv = len(tp.kv_heads(c.num_key_value_heads)) * hd
    sizes = {  # (input_size, output_size), whole
        "self_attn.qkv_proj": (hidden, tp.degree * (local_q + 2 * local_kv)),
        "self_attn.o_proj": (c.num_attention_heads * hd, hidden),
        "mlp.gate_up_proj": (hidden, 2 * c.intermediate_size),
        "mlp.down_proj": (c.intermediate_size, hidden),
    }
    plans = []
    for i, layer in enumerate(target.layers):
        for kind, style in LAYER_PLAN.items():
            if kind.startswith("mlp.") and layer.config.moe is not None:  # experts: `split_rank_tensors`
                continue
            module = layer.get_submodule(kind)
            plans.append(ProjectionPlan(i, kind, style, *sizes[kind], bias=getattr(module, "bias", None) is not None,
                                        dtype=module.weight.dtype))
    return plans


def whole_projection(plan: ProjectionPlan, module: nn.Module, config, tp: TensorParallel) -> dict[str, Tensor]:
    """The whole tensors NxD shards for one of our projections (an nn.Linear, weight [out, in], NxD's
    layout too): a column layer's rows regrouped rank by rank, a row layer's as they are. Keys:
    "weight", "bias"."""
    c = config
    q_rows, kv_rows, mlp_rows = tp.rank_rows(target_layer_config(c, 0))
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # A fused column projection: the sizes of its parts (q, k, v or gate, up) and each part's rows per rank.
    groups = {"self_attn.qkv_proj": ([q, kv, kv], [q_rows, kv_rows, kv_rows]),
              "mlp.gate_up_proj": ([c.intermediate_size] * 2, [mlp_rows, mlp_rows])}
    tensors = {"weight": module.weight.detach()}
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = module.bias.detach()
    whole = {}
    for kind, tensor in tensors.items():
        if plan.style == COLUMN:
            sizes, shares = groups[plan.kind]
            tensor = tp.rank_order(list(tensor.split(sizes)), shares)
        whole[kind] = tensor.contiguous()
        if tuple(whole[kind].shape) != plan.whole_shape(kind):
            raise ArtifactError(f"{plan.name}.{kind} is {tuple(whole[kind].shape)}, its plan needs "
                                f"{plan.whole_shape(kind)}: the projection was sharded already")
    return whole


# ---- the surgery -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    """One projection swapped: its plan, our whole layer as loaded, and the parallel layer in its place."""

    plan: ProjectionPlan
    old: nn.Module
    new: nn.Module


def nxd_layer(layers: NxdApi, plan: ProjectionPlan) -> nn.Module:
    """NxD's parallel layer for one plan, under its parallel state (uninitialised in AOT mode: the
    weights come from `shard_checkpoint`)."""
    if plan.style == COLUMN:
        layer = layers.ColumnParallelLinear(plan.input_size, plan.output_size, bias=plan.bias, gather_output=False,
                                            dtype=plan.dtype)
    else:
        layer = layers.RowParallelLinear(plan.input_size, plan.output_size, bias=plan.bias, input_is_parallel=True,
                                         dtype=plan.dtype, reduce_dtype=torch.float32)
    return layer.requires_grad_(False)


def shard_target(target: nn.Module, caches: Sequence[nn.Module], tp: TensorParallel,
                 make_layer: Callable[[ProjectionPlan], nn.Module]) -> list[Swap]:
    """Swap every planned projection of the (unsharded) target for `make_layer(plan)` on the same device,
    give attention and MLP a rank's head counts and width, and remake the target's KV caches `caches`
    (buffers [B, kv_heads, max_length, hd]) with a rank's KV heads, zeroed. Returns the swaps."""
    c = target.config
    plans = plan_projections(target, tp)
    for cache in caches:
        if cache.shape[1] != c.num_key_value_heads or cache.num_layers != c.num_hidden_layers:
            raise ArtifactError(f"the cache to shard ({cache.num_layers} layers of {list(cache.shape)}) is not "
                                f"the target's ({c.num_hidden_layers} layers of {c.num_key_value_heads} KV heads)")
    swaps = []
    for plan in plans:
        parent = target.get_submodule(plan.name.rpartition(".")[0])
        attr = plan.kind.rpartition(".")[2]
        old = getattr(parent, attr)
        new = make_layer(plan).to(old.weight.device)
        setattr(parent, attr, new)
        swaps.append(Swap(plan, old, new))
    for layer in target.layers:  # the plan's share of a rank (every rank's is the same size: one SPMD trace)
        shard = tp.layer_shard(layer.config)
        layer.self_attn.num_heads, layer.self_attn.num_kv_heads = len(shard.heads), len(shard.kv_heads)
        if layer.config.moe is None:
            layer.mlp.intermediate_size = len(shard.width)
    for cache in caches:
        resize_cache(cache, target.layers[0].self_attn.num_kv_heads)
    return swaps


def resize_cache(cache: nn.Module, num_kv_heads: int) -> None:
    """Remake a KV cache's buffers [B, kv_heads, L, hd], zeroed, with `num_kv_heads` (same dtype, device)."""
    for name, buffer in list(cache.named_buffers(recurse=False)):
        if buffer.dim() != 4:  # not keys or values (a sliding window's positions)
            continue
        shape = (buffer.shape[0], num_kv_heads, *buffer.shape[2:])
        cache.register_buffer(name, torch.zeros(shape, dtype=buffer.dtype, device=buffer.device), persistent=False)
    cache.shape = (cache.shape[0], num_kv_heads, *cache.shape[2:])


@dataclass
class RankTensors:
    """A tensor of the target whose value differs per rank but not its shape: `per_rank[r]` is rank r's (the
    module holds rank 0's, for the trace)."""

    owner: nn.Module
    name: str  # the parameter's or buffer's name in `owner`
    per_rank: list[Tensor]

    def use(self, rank: int) -> None:
        """Give the module rank `rank`'s value (a copy of its own)."""
        value = self.per_rank[rank].contiguous().clone()
        if self.name in self.owner._buffers:
            self.owner._buffers[self.name] = value
        else:
            setattr(self.owner, self.name, nn.Parameter(value, requires_grad=False))


def split_rank_tensors(target: nn.Module, tp: TensorParallel, make_reduce: Callable[[], nn.Module]
                       ) -> list[RankTensors]:
    """The parts of the (loaded, unsharded) target the plan splits outside NxD's parallel layers: gpt-oss's
    sinks (by the rank's heads) and every mixture-of-experts layer's experts (the rank's E/N, whole, and
    their first index), each module left with rank 0's share; a sparse MLP's partial outputs then summed
    by `make_reduce()`. Returns every such tensor with each rank's value."""
    out = []
    shards = [[tp.for_rank(r).layer_shard(layer.config) for r in range(tp.degree)] for layer in target.layers]
    for layer, per_rank in zip(target.layers, shards):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.sinks is not None:
            out.append(RankTensors(attn, "sinks", [attn.sinks[s.heads.start:s.heads.stop] for s in per_rank]))
        if layer.config.moe is None:
            continue
        experts = mlp.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            out.append(RankTensors(experts, name, [param[s.experts.start:s.experts.stop] for s in per_rank]))
        out.append(RankTensors(experts, "first_expert", [torch.tensor(s.experts.start, dtype=torch.int64)
                                                         for s in per_rank]))
        experts.held = per_rank[0].experts
        mlp.sum_ranks = make_reduce()
    for part in out:
        part.use(0)
    return out


def persist_tables(specs: Sequence) -> None:
    """Make every buffer of the planned graphs that is not state (rotary cos/sin, datastore tables,
    masks, d2t) persistent: `shard_checkpoint` keeps only names in the model's `state_dict()`."""
    for spec in specs:
        state = {id(t) for t in spec.state_buffers.values()}
        for module in spec.module.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if id(buffer) not in state:
                    module.register_buffer(name, buffer, persistent=True)


# ---- the weight dict ----------------------------------------------------------------------------------


def rank_tensor_names(graphs: dict[str, nn.Module], parts: Sequence[RankTensors]) -> dict[str, RankTensors]:
    """Every name (in the bundle's weight dict) of a tensor whose value differs per rank (found by its
    module, which moving the graphs to a device keeps, where a buffer becomes a new tensor)."""
    owners: dict[int, list[RankTensors]] = {}
    for part in parts:
        owners.setdefault(id(part.owner), []).append(part)
    names = {}
    for graph in graphs.values():
        for prefix, module in graph.named_modules(remove_duplicate=False):
            for part in owners.get(id(module), ()):
                names[f"{prefix}.{part.name}" if prefix else part.name] = part
    return names


def swapped_names(graphs: dict[str, nn.Module], swaps: Sequence[Swap]) -> dict[str, tuple[Swap, str]]:
    """Every name (in the bundle's weight dict) of a swapped layer's parameter -> (its swap, "weight"/"bias")."""
    owners = {id(getattr(swap.new, kind)): (swap, kind) for swap in swaps for kind in KINDS
              if getattr(swap.new, kind, None) is not None}
    names = {}
    for graph in graphs.values():
        for name, param in graph.named_parameters(remove_duplicate=False):
            if id(param) in owners:
                names[name] = owners[id(param)]
    return names


def rank_checkpoints(shard_checkpoint: Callable, graphs: dict[str, nn.Module], checkpoint: dict[str, Tensor],
                     degree: int) -> list[dict[str, Tensor]]:
    """One weight dict per rank: NxD's `shard_checkpoint(checkpoint, model)` on each graph's share of the
    whole dict (it shards by the parallel layers it finds in that model), merged by name. Refuses a name
    it dropped, other than state (which starts zeroed on the device)."""
    ranks: list[dict[str, Tensor]] = [{} for _ in range(degree)]
    state = set()
    for graph in graphs.values():
        state.update(f"graph.{name}" for name in getattr(graph, "state_names", ()))
        own = set(graph.state_dict(keep_vars=True))
        shards = shard_checkpoint({n: t for n, t in checkpoint.items() if n in own}, graph)
        if len(shards) != degree:
            raise ArtifactError(f"shard_checkpoint made {len(shards)} weight dicts, the graphs run on {degree} ranks")
        for rank, shard in zip(ranks, shards):
            rank.update(shard)
    dropped = sorted(set(checkpoint) - set(ranks[0]) - state)
    if dropped:
        raise ArtifactError(f"shard_checkpoint dropped {dropped[:5]}: names missing from every graph's state_dict() "
                            "(a buffer that is not persistent?)")
    return ranks


class NxdTensorParallel:
    """The target of one engine on NxD's parallel layers (made, and used, under `parallel_state`)."""

    def __init__(self, degree: int, swaps: list[Swap], config, shard_checkpoint: Callable | None = None,
                 rank_tensors: list[RankTensors] | None = None) -> None:
        self.degree = degree
        self.tp = TensorParallel(degree)
        self.swaps = swaps
        self.config = config
        self.rank_tensors = rank_tensors or []
        self._shard_checkpoint = shard_checkpoint

    @classmethod
    def of(cls, target: nn.Module, caches: Sequence[nn.Module], degree: int) -> "NxdTensorParallel":
        """Swap NxD's parallel layers into the target, split its experts and sinks, shard its KV caches."""
        layers = require_sdk()
        tp = TensorParallel(degree)
        swaps = shard_target(target, caches, tp, functools.partial(nxd_layer, layers))
        parts = split_rank_tensors(target, tp, lambda: AllReduce(layers.reduce_from_tensor_model_parallel_region))
        return cls(degree, swaps, target.config, layers.shard_checkpoint, parts)

    def persist_tables(self, specs: Sequence) -> None:
        persist_tables(specs)

    def layout(self, bundle) -> dict[str, Tensor]:
        """The whole weight dict as meta tensors (names, shapes, dtypes; nothing computed): what a build
        records, and what `whole_checkpoint` then makes at load."""
        out = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in bundle.checkpoint.items()}
        for name, (swap, kind) in swapped_names(bundle.graphs, self.swaps).items():
            out[name] = torch.empty(swap.plan.whole_shape(kind), dtype=swap.plan.dtype, device="meta")
        return out

    def whole_checkpoint(self, bundle) -> dict[str, Tensor]:
        """The bundle's weight dict with each swapped projection's tensors whole (rows in rank order)."""
        wholes: dict[int, dict[str, Tensor]] = {}
        out = dict(bundle.checkpoint)
        for name, (swap, kind) in swapped_names(bundle.graphs, self.swaps).items():
            if id(swap) not in wholes:
                wholes[id(swap)] = whole_projection(swap.plan, swap.old, self.config, self.tp)
            out[name] = wholes[id(swap)][kind]
        return out

    def rank_checkpoints(self, bundle, whole: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """The per-rank weight dicts `NxDModel.set_weights` takes, sharded by NxD (SDK)."""
        if self._shard_checkpoint is None:
            raise BackendUnavailableError(INSTALL_HINT)
        ranks = rank_checkpoints(self._shard_checkpoint, bundle.graphs, whole, self.degree)
        for name, part in rank_tensor_names(bundle.graphs, self.rank_tensors).items():  # each rank its own
            for rank, weights in enumerate(ranks):
                weights[name] = part.per_rank[rank].contiguous()
        return ranks

