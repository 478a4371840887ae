"""Building blocks of Llama-style decoders, written for fixed-shape tracing.

Linear layers are created only through `make_linear`, each a plain `nn.Linear`: weight
[out_features, in_features], the layout of Hugging Face checkpoints, of PyTorch's parallel styles and
of neuronx-distributed's parallel layers, so loaders copy tensors as they are. How a weight sits in
memory is the backend's choice, not the model's (`backends/layout.py`). A layer takes one `LayerConfig`
and is built whole; the code reads its head counts and widths from its modules (`num_heads`,
`num_kv_heads`, `intermediate_size`), so that the parallel plan (neuron_peagle/parallel.py), applied
after construction, can give a layer one rank's share: it sets those counts, the projections' shapes, the
checkpoint slices the layer holds (`LayerShard`) and the sums across ranks (`sum_ranks`, an identity
where nothing is split). Nothing here knows about ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from neuron_peagle.config import MoeConfig, RopeConfig
from neuron_peagle.kv_cache import KVCache, WindowPlan
from neuron_peagle.models.moe import SparseMoe


@dataclass(frozen=True)
class LayerConfig:
    """One decoder layer's shape and options (as gpt-fast's TransformerBlock takes its config): built
    per layer from the target's ModelConfig (`models.target.target_layer_config`) and from a
    DrafterConfig (`models.drafter.drafter_layer_config`). Attention and MLP read it too."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float  # of every RMSNorm of the layer
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head, before rope
    moe: MoeConfig | None = None  # the MLP is a mixture of experts (models/moe.py)
    sliding_window: int | None = None  # gpt-oss: attends to the last `sliding_window` positions only
    sinks: bool = False  # gpt-oss: one learned logit per head joins the softmax
    norm_scale_in_float32: bool = False  # the layer norms' order of scale and cast (`RMSNorm`)
    input_size: int | None = None  # attention's input width where it is not hidden_size (drafter layer 0: 2H)

    @property
    def attention_input_size(self) -> int:
        return self.input_size if self.input_size is not None else self.hidden_size


@dataclass(frozen=True)
class LayerShard:
    """Which part of a decoder layer's checkpoint tensors the layer holds (global indices): query heads,
    KV heads, columns of the MLP's width, experts; and whether it adds the biases of the projections whose
    outputs are summed across ranks (o, down: one rank adds them, or the sum would count them N times).
    `whole`: everything, as built."""

    heads: range
    kv_heads: range
    width: range
    experts: range
    adds_summed_biases: bool = True

    @classmethod
    def whole(cls, config: LayerConfig) -> "LayerShard":
        experts = config.moe.num_experts if config.moe is not None else 0
        return cls(range(config.num_heads), range(config.num_kv_heads), range(config.intermediate_size),
                   range(experts))


class Embedding(nn.Module):
    """Token embedding table; weight: [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:  # [...] -> [..., hidden]
        return self.weight[ids]


def make_linear(in_features: int, out_features: int, bias: bool = False,
                weight: nn.Parameter | None = None) -> nn.Linear:
    """An `nn.Linear` (weight [out, in]) with no gradient, its tensors left for a loader to fill (on the
    meta device when built under `torch.device("meta")`); given `weight` (a tied LM head: the embedding
    matrix), that parameter, with no matrix of its own allocated."""
    if weight is not None:
        assert not bias and weight.shape == (out_features, in_features), (bias, weight.shape)
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = weight
        return layer
    layer = skip_init(nn.Linear, in_features, out_features, bias=bias, device=torch.empty(0).device)
    layer.requires_grad_(False)
    return layer


class RMSNorm(nn.Module):
    """Statistics in float32 whatever the model dtype, of the input as the model dtype holds it
    (`rounded_float`). Llama and Qwen cast the normalized values back to the
    input's dtype and then scale; gpt-oss scales in float32 and then casts (`scale_in_float32`). The two
    differ only in rounding, below float32."""

    def __init__(self, hidden_size: int, eps: float, scale_in_float32: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.scale_in_float32 = scale_in_float32
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., hidden]
        x32 = rounded_float(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_float32:
            return (self.weight * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rounded_float(x: Tensor) -> Tensor:
    """`x.float()` with the value rounded to x's dtype by its bits (`bf16_rounded`).

    Where a bf16 `x` is computed inside the same fused kernel as its consumer (the residual add before
    a norm), inductor keeps it in float32 unless told to emulate every cast, and whether it is fused
    depends on the graph: a layer whose output is also a feature for the drafter is stored and
    reloaded (rounded) in the speculative step and fused (not rounded) in a plain step. Rounding by
    integer arithmetic is not a cast any compiler elides, so every graph sees the value eager sees (an
    identity where `x` is already bf16 in memory). So only a graph being compiled rounds; eager (the
    reference, and training, where integer arithmetic would stop the gradient) holds `x` in bf16 already
    and takes `x.float()`, as do float32 and float16."""
    x32 = x.float()
    if x.dtype == torch.bfloat16 and torch.compiler.is_compiling() and not x.requires_grad:
        return bf16_rounded(x32)
    return x32


def bf16_rounded(x32: Tensor) -> Tensor:
    """float32 values rounded to the nearest bfloat16 (ties to even, overflow to infinity), still float32:
    `x32.to(torch.bfloat16).float()` by integer arithmetic on the bits."""
    bits = x32.view(torch.int32)  # bf16 keeps the high 16 bits
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 == 0xFFFF0000
    return bits.view(torch.float32)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:  # [head_dim // 2] float32
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, head_dim)
    # Llama 3 scaling: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """YaRN: dimensions that turn fewer than beta_slow times over the original context are interpolated
    (frequency / factor), those that turn more than beta_fast times kept, a linear ramp between."""
    def dimension(rotations: float) -> float:
        return head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolated = 1 - ramp  # the share of the original frequency
    return (1.0 / (rope.factor * base)) * ramp + (1.0 / base) * extrapolated


class RotaryTable(nn.Module):
    """cos/sin for every position up to max_length, looked up by position id inside the graph."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_length: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_length, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_length, head_dim]
        self.register_buffer("cos", emb.cos() * rope.attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * rope.attention_factor, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:  # [B, T] -> 2 x [B, 1, T, hd]
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x: [B, heads, T, hd]
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over a fixed-length KV cache, masked by position.

    The new keys/values are written to the cache at their position ids first (`KVCache.write`, in the
    way the backend chose: neuron_peagle.state_writes); then every query attends to all cache slots
    whose position is <= its own. Slots beyond a sequence's length hold stale or padding entries and
    are never read, so rejected speculative entries need no cleanup.
    """

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        c = config
        # gpt-oss: a sliding-window layer attends to the last `sliding_window` positions, from a ring of
        # its own (see `kv_cache.WindowPlan`); sinks are one learned logit per head that joins the softmax.
        self.sliding_window = c.sliding_window
        self.sinks = nn.Parameter(torch.zeros(c.num_heads), requires_grad=False) if c.sinks else None
        # The heads this module computes: all of them as built, a rank's once the parallel plan applied.
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = hd = c.head_dim
        self.qkv_proj = make_linear(c.attention_input_size, (self.num_heads + 2 * self.num_kv_heads) * hd, c.qkv_bias)
        self.o_proj = make_linear(self.num_heads * hd, c.hidden_size, c.o_bias)
        self.sum_ranks: nn.Module = nn.Identity()  # o_proj's partial sums -> the whole output
        # Qwen3: an RMSNorm over each query and key head (one weight of head_dim for all heads), before rope.
        self.q_norm = RMSNorm(hd, c.eps) if c.qk_norm else None
        self.k_norm = RMSNorm(hd, c.eps) if c.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                layer: int = 0, visible: Tensor | None = None, window: WindowPlan | None = None) -> Tensor:
        # x: [B, T, hidden_in]; position_ids: [B, T]; the new keys and values go to layer `layer` of `cache`.
        # Without a cache (training) the T inputs attend to each other under `visible` [B, T, T].
        batch, seq, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(batch, seq, nh, hd)
        k = k.view(batch, seq, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # [B, nh, T, hd]
        k = k.transpose(1, 2)  # [B, nkv, T, hd]
        v = v.view(batch, seq, nkv, hd).transpose(1, 2)
        q = apply_rope(q, cos, sin).reshape(batch, nkv, nh // nkv * seq, hd)  # query heads of a KV head side by side
        k = apply_rope(k, cos, sin)

        if cache is None:
            keys, values = k, v
        elif self.sliding_window is not None:
            keys, values, visible = self._window_keys(cache, layer, k, v, position_ids, window)
        else:
            keys, values = cache.write(layer, position_ids, k, v)  # [B, nkv, read_length, hd] each
            return self._output(self.attend_cache(q, keys, values, position_ids), x.dtype)
        return self._output(self.attend(q, keys, values, visible), x.dtype)

    def attend_cache(self, q: Tensor, keys: Tensor, values: Tensor, position_ids: Tensor) -> Tensor:
        """Attention over a cache's slots: query row r of KV head h (its query heads side by side, each with
        the step's T tokens) sees the slots up to its token's position. q [B, nkv, groups*T, hd], keys and
        values [B, nkv, read_length, hd], position_ids [B, T] -> [B, nkv, groups*T, hd]. The CPU backends
        swap in a kernel that reads only the slots some row sees (kernels/cpu_attention.py)."""
        slot = torch.arange(keys.shape[2], device=q.device)
        return self.attend(q, keys, values, slot.view(1, 1, -1) <= position_ids.unsqueeze(-1))

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """q [B, nkv, groups*T, hd] over keys and values [B, nkv, S, hd] where `visible` [B, T, S]."""
        batch, nkv, rows, hd = q.shape
        seq, length = visible.shape[1], keys.shape[2]
        groups = rows // seq
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() / math.sqrt(hd)
        scores = scores.view(batch, nkv, groups, seq, length)
        scores = scores.masked_fill(~visible.view(batch, 1, 1, seq, length), float("-inf"))
        if self.sinks is None:
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
        else:  # softmax over [scores, sink], the sink's share dropped
            sink = self.sinks.float().view(1, nkv, groups, 1, 1)
            top = torch.maximum(scores.amax(-1, keepdim=True), sink)
            exp = torch.exp(scores - top)
            probs = (exp / (exp.sum(-1, keepdim=True) + torch.exp(sink - top))).to(values.dtype)
        return torch.matmul(probs.view(batch, nkv, rows, length), values)

    def _output(self, out: Tensor, dtype: torch.dtype) -> Tensor:  # [B, nkv, groups*T, hd] -> [B, T, hidden]
        batch, nkv, rows, hd = out.shape
        seq = rows * nkv // self.num_heads
        out = out.view(batch, self.num_heads, seq, hd).transpose(1, 2).reshape(batch, seq, self.num_heads * hd)
        return self.sum_ranks(self.o_proj(out.to(dtype)))

    def _window_keys(self, cache: KVCache, layer: int, k: Tensor, v: Tensor, position_ids: Tensor,
                     window: WindowPlan) -> tuple[Tensor, Tensor, Tensor]:
        """The ring's entries and the new ones side by side ([B, nkv, S + T, hd] each) with what each
        query sees of them ([B, T, S + T]: positions in (q - sliding_window, q]); the ring then takes
        the newest entry of each of its slots."""
        key_ring, value_ring = cache.layer(layer)
        keys = torch.cat([key_ring.to(k.dtype), k], dim=2)
        values = torch.cat([value_ring.to(v.dtype), v], dim=2)
        key_positions = torch.cat([window.old_positions, position_ids], dim=1).unsqueeze(1)  # [B, 1, S+T]
        query = position_ids.unsqueeze(-1)  # [B, T, 1]
        visible = (key_positions <= query) & (key_positions > query - self.sliding_window)
        cache.write_ring(layer, k, v, window)
        return keys, values, visible


class MLP(nn.Module):
    """SwiGLU with gate and up projections fused into one matmul."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        c = config
        self.intermediate_size = c.intermediate_size  # the width this module computes
        self.gate_up_proj = make_linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias)
        self.down_proj = make_linear(c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.sum_ranks: nn.Module = nn.Identity()  # down_proj's partial sums -> the whole output

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.sum_ranks(self.down_proj(nn.functional.silu(gate) * up))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block; with `config.moe`, its MLP is a mixture of experts (models/moe.py)."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.shard = LayerShard.whole(config)  # what of the checkpoint the layer holds (the parallel plan's)
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps, c.norm_scale_in_float32)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps, c.norm_scale_in_float32)
        self.mlp = SparseMoe(c.hidden_size, c.moe) if c.moe is not None else MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                layer: int = 0, visible: Tensor | None = None,
                window: WindowPlan | None = None) -> Tensor:  # [B, T, H] -> [B, T, H]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, position_ids, cache, layer, visible, window)
        return h + self.mlp(self.post_attention_layernorm(h))
