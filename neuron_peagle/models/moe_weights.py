"""Checkpoint names, shapes and loading of the mixture-of-experts MLPs (models/moe.py), in the two layouts
the Hub's checkpoints use:

- qwen3_moe: one set of Linear weights per expert, `mlp.experts.{e}.{gate,up,down}_proj.weight`
  ([out, in]), and the router `mlp.gate.weight` [E, hidden];
- gpt_oss: the experts fused, `mlp.experts.gate_up_proj` [E, hidden, 2I] with gate and up columns
  interleaved (gate at even, up at odd), `mlp.experts.down_proj` [E, I, hidden], their biases, and
  `mlp.router.{weight,bias}`; as published, the two expert matrices are MXFP4 blocks and scales
  (models/mxfp4.py), dequantized before loading.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuron_peagle.config import MoeConfig
from neuron_peagle.models.mxfp4 import quantized_shapes


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
def load_moe(moe, t: dict[str, Tensor], prefix: str, architecture: str) -> None:
    """Copy one layer's sparse MLP (a `models.moe.SparseMoe`) from checked tensors `t`."""
    experts = moe.experts
    if architecture == "gpt_oss":
        moe.router.weight.copy_(t[prefix + "router.weight"])
        moe.router.bias.copy_(t[prefix + "router.bias"])
        experts.gate_up.copy_(_deinterleave(t[prefix + "experts.gate_up_proj"]))
        experts.gate_up_bias.copy_(_deinterleave(t[prefix + "experts.gate_up_proj_bias"]))
        experts.down.copy_(t[prefix + "experts.down_proj"])
        experts.down_bias.copy_(t[prefix + "experts.down_proj_bias"])
        return
    moe.router.weight.copy_(t[prefix + "gate.weight"])
    for n in range(moe.config.num_experts):
        base = f"{prefix}experts.{n}."
        experts.gate_up[n].copy_(torch.cat([t[base + "gate_proj.weight"], t[base + "up_proj.weight"]]).t())
        experts.down[n].copy_(t[base + "down_proj.weight"].t())
