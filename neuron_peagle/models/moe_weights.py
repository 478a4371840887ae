"""Checkpoint names, shapes and loading of the mixture-of-experts MLPs (models/moe.py), in the two layouts
the Hub's checkpoints use:

- qwen3_moe: one set of Linear weights per expert, `mlp.experts.{e}.{gate,up,down}_proj.weight`
  ([out, in]), and the router `mlp.gate.weight` [E, hidden];
- gpt_oss: the experts fused, `mlp.experts.gate_up_proj` [E, hidden, 2I] with gate and up columns
  interleaved (gate at even, up at odd), `mlp.experts.down_proj` [E, I, hidden], their biases, and
  `mlp.router.{weight,bias}`; as published, the two expert matrices are MXFP4 blocks and scales
  (models/mxfp4.py), dequantized as they are read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuron_peagle.config import MoeConfig
from neuron_peagle.models.checkpoint import Checkpoint, put
from neuron_peagle.models.mxfp4 import dequantize, quantized_shapes


def moe_shapes(prefix: str, hidden: int, moe: MoeConfig, architecture: str,
               quantization: str | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one layer's sparse MLP tensors; `prefix` ends with "mlp."; with
    quantization "mxfp4", the expert matrices' blocks and scales in place of the matrices."""
    e, i = moe.num_experts, moe.expert_intermediate_size
    if architecture == "gpt_oss":
        shapes = {prefix + "router.weight": (e, hidden), prefix + "router.bias": (e,),
                  prefix + "experts.gate_up_proj_bias": (e, 2 * i), prefix + "experts.down_proj_bias": (e, hidden)}
        if quantization == "mxfp4":
            shapes.update(quantized_shapes(prefix + "experts.gate_up_proj", e, 2 * i, hidden))
            shapes.update(quantized_shapes(prefix + "experts.down_proj", e, hidden, i))
        else:
            shapes.update({prefix + "experts.gate_up_proj": (e, hidden, 2 * i),
                           prefix + "experts.down_proj": (e, i, hidden)})
        return shapes
    shapes = {prefix + "gate.weight": (e, hidden)}
    for n in range(e):
        shapes.update({f"{prefix}experts.{n}.gate_proj.weight": (i, hidden),
                       f"{prefix}experts.{n}.up_proj.weight": (i, hidden),
                       f"{prefix}experts.{n}.down_proj.weight": (hidden, i)})
    return shapes


def _deinterleave(fused: Tensor) -> Tensor:  # [..., 2I] gate/up alternating -> [..., 2I] gate, then up
    return torch.cat([fused[..., 0::2], fused[..., 1::2]], dim=-1)


@torch.no_grad()
def load_moe(moe: nn.Module, checkpoint: Checkpoint, prefix: str, architecture: str,
             dtype: torch.dtype | None = None) -> None:
    """Read one layer's sparse MLP (a `models.moe.SparseMoe`) from a checked checkpoint: the router whole,
    the experts `moe.experts.held` only (all of them unless expert parallelism split the layer)."""
    experts, held = moe.experts, moe.experts.held
    names = checkpoint.infos()
    experts.first_expert = torch.tensor(held.start, dtype=torch.int64)

    def read(name: str, rows: range | None = None) -> Tensor:
        return checkpoint.read(prefix + name, rows, None, dtype)

    if architecture == "gpt_oss":
        put(moe.router, "weight", read("router.weight"))
        put(moe.router, "bias", read("router.bias"))
        for ours, theirs in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            if prefix + f"experts.{theirs}_blocks" in names:
                blocks, scales = (checkpoint.read(prefix + f"experts.{theirs}_{part}", held)
                                  for part in ("blocks", "scales"))
                matrix = dequantize(blocks, scales, prefix + f"experts.{theirs}", dtype or torch.float32)
            else:
                matrix = read(f"experts.{theirs}", held)
            put(experts, ours, _deinterleave(matrix) if ours == "gate_up" else matrix)
        put(experts, "gate_up_bias", _deinterleave(read("experts.gate_up_proj_bias", held)))
        put(experts, "down_bias", read("experts.down_proj_bias", held))
        return
    put(moe.router, "weight", read("gate.weight"))
    gate_up, down = (torch.empty(tuple(p.shape), dtype=dtype or torch.float32) for p in (experts.gate_up, experts.down))
    for local, n in enumerate(held):  # one expert at a time into the stacked matrices
        base = f"experts.{n}."
        gate_up[local] = torch.cat([read(base + "gate_proj.weight"), read(base + "up_proj.weight")]).t()
        down[local] = read(base + "down_proj.weight").t()
    put(experts, "gate_up", gate_up)
    put(experts, "down", down)
