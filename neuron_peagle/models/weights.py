"""Checkpoint tensors by Hugging Face name, checked exactly, into our fused projections."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from neuron_peagle.errors import WeightsError
from neuron_peagle.models.checkpoint import Checkpoint, SafetensorsDir, TensorInfo, put
from neuron_peagle.models.layers import LayerConfig
from neuron_peagle.models.moe_weights import load_moe


def read_safetensors_dir(model_dir: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """All tensors of a directory's `*.safetensors` files, whole, in their own dtypes (a drafter's: small),
    except the files named in `exclude` (a drafter directory's datastore is not weights)."""
    return SafetensorsDir.open(model_dir, exclude).read_all()


def check_names_and_shapes(tensors: Mapping[str, Tensor | TensorInfo], expected: dict[str, tuple[int, ...]],
                           optional: set[str], source: str,
                           dtypes: Mapping[str, tuple[torch.dtype, str]] | None = None) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor (and, for the names in
    `dtypes`: name -> (dtype, who stores it so), every tensor of another dtype); `tensors` may be headers
    (`Checkpoint.infos`)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    for name, (dtype, why) in (dtypes or {}).items():
        if name in tensors and tensors[name].dtype != dtype:
            problems.append(f"{name} is {tensors[name].dtype}, {why} stores {str(dtype).removeprefix('torch.')}")
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def decoder_layer_shapes(prefix: str, config: LayerConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of one Llama-style decoder layer's tensors (a dense MLP's, whatever
    `config.moe`: the experts' names are the architecture's, models/moe_weights.py)."""
    c = config
    hidden, width, hidden_in = c.hidden_size, c.intermediate_size, c.attention_input_size
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
        prefix + "self_attn.q_proj.weight": (q_out, hidden_in),
        prefix + "self_attn.k_proj.weight": (kv_out, hidden_in),
        prefix + "self_attn.v_proj.weight": (kv_out, hidden_in),
        prefix + "self_attn.o_proj.weight": (hidden, q_out),
        prefix + "mlp.gate_proj.weight": (width, hidden),
        prefix + "mlp.up_proj.weight": (width, hidden),
        prefix + "mlp.down_proj.weight": (hidden, width),
    }
    if c.qkv_bias:
        shapes.update({prefix + "self_attn.q_proj.bias": (q_out,), prefix + "self_attn.k_proj.bias": (kv_out,),
                       prefix + "self_attn.v_proj.bias": (kv_out,)})
    if c.o_bias:
        shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
    if c.qk_norm:
        shapes.update({prefix + "self_attn.q_norm.weight": (c.head_dim,),
                       prefix + "self_attn.k_norm.weight": (c.head_dim,)})
    if c.mlp_bias:
        shapes.update({prefix + "mlp.gate_proj.bias": (width,), prefix + "mlp.up_proj.bias": (width,),
                       prefix + "mlp.down_proj.bias": (hidden,)})
    return shapes


def head_rows(heads: range, head_dim: int) -> range:
    """The rows (of q, k or v; the columns of o) that hold `heads`."""
    return range(heads.start * head_dim, heads.stop * head_dim)


@torch.no_grad()
def load_decoder_layer(layer: nn.Module, checkpoint: Checkpoint, prefix: str, dtype: torch.dtype | None = None,
                       moe_architecture: str | None = None) -> None:
    """Read one layer's Hugging Face tensors (checked beforehand), only the slices `layer.shard` says it
    holds (a `LayerShard`: all of them unless the parallel plan split the layer), into its fused
    projections, [out, in] as they come: q/k/v rows into qkv_proj, gate/up rows into gate_up_proj."""
    shard, attn, mlp = layer.shard, layer.self_attn, layer.mlp

    def read(name: str, rows: range | None = None, cols: range | None = None) -> Tensor:
        return checkpoint.read(prefix + name, rows, cols, dtype)

    def summed_bias(name: str) -> Tensor:  # a bias added after the sum across ranks: by one rank only
        bias = read(name)
        return bias if shard.adds_summed_biases else torch.zeros_like(bias)

    put(layer.input_layernorm, "weight", read("input_layernorm.weight"))
    put(layer.post_attention_layernorm, "weight", read("post_attention_layernorm.weight"))
    if attn.q_norm is not None:  # per head: the same for every head
        put(attn.q_norm, "weight", read("self_attn.q_norm.weight"))
        put(attn.k_norm, "weight", read("self_attn.k_norm.weight"))
    if getattr(attn, "sinks", None) is not None:
        put(attn, "sinks", read("self_attn.sinks", shard.heads))
    q, kv = head_rows(shard.heads, attn.head_dim), head_rows(shard.kv_heads, attn.head_dim)
    for kind in ("weight", "bias") if attn.qkv_proj.bias is not None else ("weight",):
        put(attn.qkv_proj, kind, torch.cat([read(f"self_attn.q_proj.{kind}", q), read(f"self_attn.k_proj.{kind}", kv),
                                            read(f"self_attn.v_proj.{kind}", kv)]))
    put(attn.o_proj, "weight", read("self_attn.o_proj.weight", cols=q))
    if attn.o_proj.bias is not None:
        put(attn.o_proj, "bias", summed_bias("self_attn.o_proj.bias"))
    if moe_architecture is not None:  # the sparse MLP: models/moe_weights.py
        load_moe(mlp, checkpoint, prefix + "mlp.", moe_architecture, dtype)
        return
    width = shard.width
    for kind in ("weight", "bias") if mlp.gate_up_proj.bias is not None else ("weight",):
        put(mlp.gate_up_proj, kind, torch.cat([read(f"mlp.gate_proj.{kind}", width), read(f"mlp.up_proj.{kind}", width)]))
    put(mlp.down_proj, "weight", read("mlp.down_proj.weight", cols=width))
    if mlp.down_proj.bias is not None:
        put(mlp.down_proj, "bias", summed_bias("mlp.down_proj.bias"))


def export_decoder_layer(layer, prefix: str) -> dict[str, Tensor]:
    """The inverse of `load_decoder_layer`: Hugging Face names, [out, in] matrices."""
    attn, mlp = layer.self_attn, layer.mlp
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj.weight.split([nh * hd, nkv * hd, nkv * hd], dim=0)
    gate, up = mlp.gate_up_proj.weight.split(mlp.intermediate_size, dim=0)
    out = {
        prefix + "input_layernorm.weight": layer.input_layernorm.weight,
        prefix + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
        prefix + "self_attn.v_proj.weight": v,
        prefix + "self_attn.o_proj.weight": attn.o_proj.weight,
        prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
        prefix + "mlp.down_proj.weight": mlp.down_proj.weight,
    }
    if attn.q_norm is not None:
        out.update({prefix + "self_attn.q_norm.weight": attn.q_norm.weight,
                    prefix + "self_attn.k_norm.weight": attn.k_norm.weight})
    return {name: value.detach().contiguous() for name, value in out.items()}
