"""The target model (Llama, Qwen2, Qwen3; the mixture-of-experts Qwen3-MoE and gpt-oss), written for
fixed-shape tracing.

Besides logits, a forward can return the P-EAGLE drafter's features: the hidden states entering
three chosen decoder layers (Hugging Face's `hidden_states[i]` for those i), concatenated.
Logits are computed only at the requested positions, so a prefill over a 512-token bucket runs the
LM head once per sequence, not 512 times.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuron_peagle.config import ModelConfig
from neuron_peagle.errors import ConfigError, WeightsError
from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.checkpoint import Checkpoint, SafetensorsDir, put
from neuron_peagle.models.layers import DecoderLayer, Embedding, LayerConfig, RMSNorm, RotaryTable, make_linear
from neuron_peagle.models.moe_weights import moe_shapes
from neuron_peagle.models.weights import check_names_and_shapes, decoder_layer_shapes, load_decoder_layer


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's choice: early, middle and late layers."""
    if num_layers >= 6:
        return (2, num_layers // 2, num_layers - 3)
    return (0, num_layers // 2, num_layers - 1)


def target_layer_config(config: ModelConfig, i: int) -> LayerConfig:
    """Decoder layer i of the target: its MLP a mixture of experts where the model's is sparse there,
    a sliding window where the model slides there."""
    c = config
    sparse = c.moe is not None and c.moe.sparse_layers[i]
    return LayerConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, eps=c.rms_norm_eps, qkv_bias=c.qkv_bias,
        o_bias=c.o_bias, mlp_bias=c.mlp_bias, qk_norm=c.qk_norm, moe=c.moe if sparse else None,
        sliding_window=c.sliding_window if c.sliding_layers[i] else None, sinks=c.attention_sinks,
        norm_scale_in_float32=c.norm_scale_in_float32)


class TargetOutput(NamedTuple):
    logits: Tensor  # [B, R, vocab] at the requested rows
    features: Tensor | None  # [B, T, 3 * hidden], or None when not asked for


class TargetRows(NamedTuple):
    hidden: Tensor  # [B, R, hidden] after the final norm: what the LM head reads, at the requested rows
    features: Tensor | None  # [B, T, 3 * hidden], or None when not asked for


class TargetModel(nn.Module):
    def __init__(self, config: ModelConfig, max_length: int,
                 feature_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_length = max_length
        self.feature_layers = tuple(feature_layers or default_feature_layers(config.num_hidden_layers))
        if any(not 0 <= i < config.num_hidden_layers for i in self.feature_layers):
            raise ConfigError(
                f"feature layers {self.feature_layers} must lie in [0, {config.num_hidden_layers})"
            )
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(target_layer_config(c, i)) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_scale_in_float32)
        # Tied: one [vocab, hidden] matrix for both, as the checkpoint has it.
        self.lm_head = make_linear(c.hidden_size, c.vocab_size,
                                   weight=self.embed_tokens.weight if c.tie_word_embeddings else None)
        self.rotary = RotaryTable(c.rope, c.head_dim, max_length)

    def new_cache(self, batch_size: int, step_tokens: int = 1) -> KVCache:
        """The KV cache for `batch_size` sequences; a decode or verify call writes at most `step_tokens`
        tokens per sequence (K+1 for speculative decoding), which sizes the sliding-window rings."""
        c = self.config
        dtype = self.embed_tokens.weight.dtype
        kv_heads = self.layers[0].self_attn.num_kv_heads  # the KV heads these layers compute (a rank's)
        window = c.sliding_window + step_tokens - 1 if c.sliding_window else 0
        return KVCache(c.num_hidden_layers, batch_size, kv_heads, self.max_length, c.head_dim,
                       dtype, c.sliding_layers, window).to(self.embed_tokens.weight.device)

    def embed(self, input_ids: Tensor) -> Tensor:  # [B, T] -> [B, T, H]
        return self.embed_tokens(input_ids)

    def _run_layers(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache, features: bool,
                    valid_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        # -> last layer's pre-norm hidden [B, T, H], and the features [B, T, 3H] if asked for.
        # valid_lengths [B]: how many of the T inputs are real (a prefill's prompt); None: all.
        h = self.embed(input_ids)
        cos, sin = self.rotary(position_ids)
        if cache.window_positions is not None and valid_lengths is None and (
                input_ids.shape[1] > cache.window_positions.shape[1] - self.config.sliding_window + 1):
            raise ConfigError(f"a call writing {input_ids.shape[1]} tokens needs a cache made with "
                              f"new_cache(step_tokens >= {input_ids.shape[1]})")
        window = cache.plan_window(position_ids, valid_lengths)  # None without sliding-window layers
        entering: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            if features and i in self.feature_layers:
                entering[i] = h
            h = layer(h, cos, sin, position_ids, cache, i, window=window)
        if window is not None:
            cache.advance_window(window)
        return h, torch.cat([entering[i] for i in self.feature_layers], dim=-1) if features else None

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache,
                logit_index: Tensor, return_features: bool = False,
                valid_lengths: Tensor | None = None) -> TargetOutput:
        # input_ids, position_ids: [B, T]; logit_index: [B, R] rows of T whose logits are wanted
        rows = self.normed_rows(input_ids, position_ids, cache, logit_index, return_features, valid_lengths)
        return TargetOutput(self.lm_head(rows.hidden).float(), rows.features)

    def normed_rows(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache,
                    logit_index: Tensor, return_features: bool = False,
                    valid_lengths: Tensor | None = None) -> TargetRows:
        """The forward up to, not including, the LM head: for a fused LM head + argmax
        (`kernels.lm_head_argmax`) that never writes the [R, vocab] logits."""
        h, features = self._run_layers(input_ids, position_ids, cache, return_features, valid_lengths)
        picked = h.gather(1, logit_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return TargetRows(self.norm(picked), features)

    def features_and_hidden(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
        """For training data: features [B, T, 3H] and the last layer's pre-norm hidden [B, T, H]."""
        batch, seq = input_ids.shape
        h, features = self._run_layers(input_ids, position_ids, cache, True, torch.full(
            (batch,), seq, dtype=torch.int64, device=input_ids.device))
        return features, h

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def on_meta(cls, config: ModelConfig, max_length: int, dtype: torch.dtype = torch.float32,
                feature_layers: tuple[int, ...] | None = None) -> "TargetModel":
        """The model's modules with no storage (the meta device): its parameters' shapes and dtypes, for the
        parallel plan to shard, for memory estimates to count, and for `load` to fill."""
        with torch.device("meta"):
            return cls(config, max_length, feature_layers).to(dtype)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, max_length: int, dtype: torch.dtype = torch.float32,
                        feature_layers: tuple[int, ...] | None = None, config: ModelConfig | None = None,
                        shard: Callable[["TargetModel"], None] | None = None) -> "TargetModel":
        """Built on the meta device, split by `shard` (the parallel plan, given a rank: it gives each
        layer its heads, width and experts, neuron_peagle/parallel.py), checked against the checkpoint's
        headers, then filled tensor by tensor with only the slices it holds, in `dtype`. `config`: the
        directory's ModelConfig, when the caller has read it already."""
        config = config if config is not None else ModelConfig.from_dir(model_dir)
        if max_length > config.max_position_embeddings:
            raise ConfigError(
                f"max_length {max_length} exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        checkpoint = SafetensorsDir.open(model_dir)
        model = cls.on_meta(config, max_length, dtype, feature_layers)
        if shard is not None:
            shard(model)
        model.load(checkpoint, dtype)
        return model

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint's tensors, whole (what the config says a Hugging Face checkpoint holds)."""
        c = self.config
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            prefix = f"model.layers.{i}."
            layer = target_layer_config(c, i)
            layer_shapes = decoder_layer_shapes(prefix, layer)
            if layer.moe is not None:
                layer_shapes = {name: shape for name, shape in layer_shapes.items() if ".mlp." not in name}
                layer_shapes.update(moe_shapes(prefix + "mlp.", c.hidden_size, c.moe, c.architecture,
                                               c.expert_quantization))
            if c.attention_sinks:
                layer_shapes[prefix + "self_attn.sinks"] = (c.num_attention_heads,)
            shapes.update(layer_shapes)
        return shapes

    def check_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Every tensor the model reads is there with its shape (MXFP4 blocks and scales: uint8), and no
        other: all problems in one error, before anything is read."""
        optional = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        expected = self.expected_hf_shapes()
        packed = {name: (torch.uint8, "MXFP4") for name in expected if name.endswith(("_blocks", "_scales"))}
        check_names_and_shapes(checkpoint.infos(), expected, optional, checkpoint.source, packed)

    @torch.no_grad()
    def load(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        """Fill the model, built on the meta device (`on_meta`, maybe sharded), from Hugging Face tensor
        names (checked first, all problems at once), each in `dtype` as it is read. The rotary tables
        are computed here, in float32."""
        self.check_checkpoint(checkpoint)
        c = self.config
        put(self.embed_tokens, "weight", checkpoint.read("model.embed_tokens.weight", dtype=dtype))
        put(self.norm, "weight", checkpoint.read("model.norm.weight", dtype=dtype))
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            put(self.lm_head, "weight", checkpoint.read("lm_head.weight", dtype=dtype))
        checkpoint.release()
        for i, layer in enumerate(self.layers):
            load_decoder_layer(layer, checkpoint, f"model.layers.{i}.", dtype,
                               c.architecture if layer.config.moe is not None else None)
            checkpoint.release()
        self.rotary = RotaryTable(c.rope, c.head_dim, self.max_length)  # positions' angles: float32 in every dtype
        left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise WeightsError(f"internal: the loader left {left[:5]} unread")
