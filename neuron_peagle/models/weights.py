"""Reading safetensors checkpoints by name, with exact checks, into our fused projections."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from neuron_peagle.errors import ModelDirError, WeightsError
from neuron_peagle.models.layers import LayerConfig
from neuron_peagle.models.moe_weights import load_moe
from neuron_peagle.parallel import SINGLE, TensorParallel


def read_safetensors_dir(model_dir: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """All tensors of a directory's `*.safetensors` files (single file or sharded with an index),
    except the files named in `exclude` (a drafter directory's datastore is not weights)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightsError(f"{index}: unreadable shard index ({err})") from None
        files = [path / name for name in shard_names]
    else:
        files = sorted(f for f in path.glob("*.safetensors") if f.name not in exclude)
    if not files:
        raise ModelDirError(f"model directory {str(path)!r} has no *.safetensors weight file")
    tensors: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise WeightsError(f"weight shard {file.name} named by the index is missing in {path}")
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{file}: cannot read safetensors file (truncated or corrupt?): {err}") from None
        check_finite(loaded, file)
        tensors.update(loaded)
    return tensors


def check_finite(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Refuse a floating tensor holding NaN or inf (a corrupt checkpoint), naming the file and the tensor."""
    for name in sorted(tensors):
        if not is_finite(tensors[name]):
            raise WeightsError(f"{source}: tensor {name} holds NaN or inf values; the checkpoint is corrupt")


def is_finite(tensor: Tensor) -> bool:
    """Whether a tensor holds no NaN or inf (integer and boolean tensors always do). Its least and greatest
    values are checked: aminmax propagates NaN and reads the tensor once, many times faster than the
    boolean copy `torch.isfinite` makes (milliseconds for a 135M-parameter model)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no aminmax on the CPU
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_names_and_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                           optional: set[str], source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
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


@torch.no_grad()
def load_decoder_layer(layer, t: dict[str, Tensor], prefix: str, tp: TensorParallel = SINGLE,
                       moe_architecture: str | None = None) -> None:
    """Copy one layer's Hugging Face tensors (checked beforehand) into its fused projections, [out, in]
    as they come: q/k/v rows into qkv_proj, gate/up rows into gate_up_proj. With tensor parallelism the
    rows are grouped rank by rank, whole, for `TensorParallel.parallelize` to shard
    (neuron_peagle.parallel); at degree 1 the grouping is plain concatenation."""
    attn, mlp = layer.self_attn, layer.mlp
    layer.input_layernorm.weight.copy_(t[prefix + "input_layernorm.weight"])
    layer.post_attention_layernorm.weight.copy_(t[prefix + "post_attention_layernorm.weight"])
    if attn.q_norm is not None:  # per head: the same on every rank
        attn.q_norm.weight.copy_(t[prefix + "self_attn.q_norm.weight"])
        attn.k_norm.weight.copy_(t[prefix + "self_attn.k_norm.weight"])
    if getattr(attn, "sinks", None) is not None:
        attn.sinks.copy_(t[prefix + "self_attn.sinks"])
    hd, nh = attn.head_dim, attn.num_heads  # this rank's heads
    num_kv_heads = t[prefix + "self_attn.k_proj.weight"].shape[0] // hd
    width = getattr(mlp, "intermediate_size", 0)  # this rank's share; a sparse MLP has none
    q_rows, kv_rows, mlp_rows = rank_rows(tp, nh * tp.degree, num_kv_heads, hd, width * tp.degree)

    def regroup(kind: str, names: list[str], shares: list[list[range]]) -> Tensor:
        return tp.rank_order([t[f"{prefix}{name}.{kind}"] for name in names], shares)

    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    attn.qkv_proj.weight.copy_(regroup("weight", qkv, [q_rows, kv_rows, kv_rows]))
    attn.o_proj.weight.copy_(t[prefix + "self_attn.o_proj.weight"])  # whole: split by its input later
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias.copy_(regroup("bias", qkv, [q_rows, kv_rows, kv_rows]))
    if attn.o_proj.bias is not None:
        attn.o_proj.bias.copy_(t[prefix + "self_attn.o_proj.bias"])
    if moe_architecture is not None:  # the sparse MLP: models/moe_weights.py; no tensor parallelism
        load_moe(mlp, t, prefix + "mlp.", moe_architecture)
        return
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    mlp.gate_up_proj.weight.copy_(regroup("weight", gate_up, [mlp_rows, mlp_rows]))
    mlp.down_proj.weight.copy_(t[prefix + "mlp.down_proj.weight"])
    if mlp.gate_up_proj.bias is not None:
        mlp.gate_up_proj.bias.copy_(regroup("bias", gate_up, [mlp_rows, mlp_rows]))
        mlp.down_proj.bias.copy_(t[prefix + "mlp.down_proj.bias"])


def rank_rows(tp: TensorParallel, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int
              ) -> tuple[list[range], list[range], list[range]]:
    """Per rank, the rows of q, of k (and of v) and of gate (and of up) it holds, in each matrix's own
    rows ([out, in]): whole heads, its KV heads (`TensorParallel.kv_heads`: replicated where there are
    fewer than ranks), its slice of the MLP's width. What `TensorParallel.rank_order` regroups."""
    nh, width = tp.local(num_heads, "attention heads"), tp.local(intermediate, "intermediate size")
    q_rows = [range(r * nh * head_dim, (r + 1) * nh * head_dim) for r in range(tp.degree)]
    kv = [tp.for_rank(r).kv_heads(num_kv_heads) for r in range(tp.degree)]
    kv_rows = [range(heads.start * head_dim, heads.stop * head_dim) for heads in kv]
    mlp_rows = [range(r * width, (r + 1) * width) for r in range(tp.degree)]
    return q_rows, kv_rows, mlp_rows


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
