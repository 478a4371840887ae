"""The P-EAGLE drafter (an EAGLE-3 drafter with two learned placeholders for parallel drafting).

A drafter slot at position i takes the pair (target feature f_i, token t_{i+1}) and predicts t_{i+2}.
Its input is concat[norm(embed(token)), norm(h)] where h = fc(f) for a real slot. P-EAGLE's mask
slots, which stand for positions whose token and feature are not known yet, take the learned mask
token embedding and h = fc(mask_hidden) instead; so one forward over [real slots + K-1 mask slots]
proposes K tokens. Sequential (EAGLE-style) drafting instead feeds the drafter's own output hidden
state back as h, one slot per pass.

As speculators builds them (speculators.models.eagle3): the layers are Llama's or Qwen3's (per-head
q/k RMSNorm); fc's input may first pass one RMSNorm over all features (`norm_before_fc`, the
checkpoint's input_norm) or one per feature layer (`fc_norm`), mask_hidden included; with
`norm_output` the hidden state fed back across sequential steps is the final norm's output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuron_peagle.config import DrafterConfig
from neuron_peagle.kernels import DraftInputParams
from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.layers import (MLP, Attention, DecoderLayer, Embedding, LayerConfig, LayerShard, RMSNorm,
                                         RotaryTable, make_linear)


def drafter_layer_config(config: DrafterConfig, first: bool = False) -> LayerConfig:
    """The drafter's decoder layers: Llama's or Qwen3's (per-head q/k norms), no biases; layer 0's
    attention (`first`) reads the 2H-wide [norm(embedding), norm(hidden)]."""
    c = config
    return LayerConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                       eps=c.rms_norm_eps, qk_norm=c.qk_norm, input_size=2 * c.hidden_size if first else None)


class DrafterFirstLayer(nn.Module):
    """Layer 0: attention over the 2H-wide [norm(embedding), norm(hidden)], residual on the hidden."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        layer = drafter_layer_config(config, first=True)
        self.shard = LayerShard.whole(layer)
        self.norm_before_residual = config.norm_before_residual
        self.input_layernorm = RMSNorm(layer.hidden_size, layer.eps)
        self.hidden_norm = RMSNorm(layer.hidden_size, layer.eps)
        self.self_attn = Attention(layer)
        self.post_attention_layernorm = RMSNorm(layer.hidden_size, layer.eps)
        self.mlp = MLP(layer)

    def build_input(self, embeds: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        # embeds, hidden: [B, S, H] -> the attention input [B, S, 2H], the residual [B, S, H]
        normed_hidden = self.hidden_norm(hidden)
        residual = normed_hidden if self.norm_before_residual else hidden
        return torch.cat([self.input_layernorm(embeds), normed_hidden], dim=-1), residual

    def forward(self, x: Tensor, residual: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor,
                cache: KVCache | None, visible: Tensor | None = None
                ) -> Tensor:  # x [B, S, 2H] (from build_input or the fused kernel), residual [B, S, H] -> [B, S, H]
        h = residual + self.self_attn(x, cos, sin, position_ids, cache, 0, visible)
        return h + self.mlp(self.post_attention_layernorm(h))


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig, max_length: int) -> None:
        super().__init__()
        c = config
        self.config = config
        self.max_length = max_length
        self.fc = make_linear(3 * c.target_hidden_size, c.hidden_size)
        # Norms over fc's input (speculators' input_norm / fc_norm.N), where the drafter has them.
        self.input_norm = RMSNorm(3 * c.target_hidden_size, c.rms_norm_eps) if c.norm_before_fc else None
        self.fc_norm = (nn.ModuleList(RMSNorm(c.target_hidden_size, c.rms_norm_eps) for _ in range(3))
                        if c.fc_norm else None)
        self.mask_hidden = nn.Parameter(torch.zeros(3 * c.target_hidden_size), requires_grad=False)
        self.mask_embedding = nn.Parameter(torch.zeros(c.hidden_size), requires_grad=False)
        self.embed_tokens = None if c.shares_target_embedding else Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            [DrafterFirstLayer(c)]
            + [DecoderLayer(drafter_layer_config(c)) for _ in range(c.num_layers - 1)]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = make_linear(c.hidden_size, c.draft_vocab_size)
        # target_id = draft_id + d2t[draft_id]; all zeros when the draft vocabulary is the full one.
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        self.rotary = RotaryTable(c.rope, c.head_dim, max_length)

    def new_cache(self, batch_size: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch_size, c.num_key_value_heads, self.max_length, c.head_dim,
                       self.fc.weight.dtype).to(self.fc.weight.device)

    def token_embeddings(self, token_ids: Tensor, target_embedding: nn.Module) -> Tensor:  # [B, S] -> [B, S, H]
        table = self.embed_tokens if self.embed_tokens is not None else target_embedding
        return table(token_ids)

    def embed(self, token_ids: Tensor, is_mask: Tensor, target_embedding: nn.Module) -> Tensor:
        # token_ids, is_mask: [B, S] -> [B, S, H]
        embeds = self.token_embeddings(token_ids, target_embedding)
        return torch.where(is_mask.unsqueeze(-1), self.mask_embedding.to(embeds.dtype), embeds)

    def normalize_features(self, features: Tensor) -> Tensor:  # [..., 3H_target] -> the same shape
        """fc's input: the features through the drafter's input norms where it has them, else as they are."""
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            parts = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(part) for norm, part in zip(self.fc_norm, parts)], dim=-1)
        return features

    def project_features(self, features: Tensor) -> Tensor:  # [..., 3H_target] -> [..., H]
        """fc over the features, after the drafter's input norms where it has them."""
        return self.fc(self.normalize_features(features))

    def project(self, features: Tensor, is_mask: Tensor) -> Tensor:
        # features [B, S, 3H_target], is_mask [B, S] -> fc input for real slots, fc(mask_hidden) else
        hidden = self.project_features(features)
        return torch.where(is_mask.unsqueeze(-1), self.project_features(self.mask_hidden.to(hidden.dtype)), hidden)

    def draft_input_params(self, fc_mask_row: Tensor) -> DraftInputParams:
        """What the fused layer-0 input (`kernels.draft_input`) reads; fc_mask_row [H] = fc(mask_hidden),
        after the input norms where the drafter has them (the caller normalizes the features too)."""
        first = self.layers[0]
        return DraftInputParams(self.fc.weight, fc_mask_row, self.mask_embedding, first.input_layernorm,
                                first.hidden_norm, first.norm_before_residual)

    def forward(self, embeds: Tensor, hidden: Tensor, position_ids: Tensor, cache: KVCache | None,
                logit_rows: Tensor | None, visible: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        # embeds, hidden: [B, S, H]; position_ids: [B, S]; logit_rows: [B, R], or None to only fill
        # the cache -> draft-vocabulary logits [B, R, draft_vocab] (float32), and the hidden state [B, R, H]
        # sequential drafting feeds back: the last layer's output (pre-norm), or with norm_output the
        # final norm's. Training passes cache=None and the attention pattern `visible` [B, S, S] instead.
        h = self.run_layers(*self.layers[0].build_input(embeds, hidden), position_ids, cache, visible)
        if logit_rows is None:
            return None, h
        picked = pick_rows(h, logit_rows)
        normed = self.norm(picked)
        return self.lm_head(normed).float(), normed if self.config.norm_output else picked

    def run_layers(self, x: Tensor, residual: Tensor, position_ids: Tensor, cache: KVCache | None,
                   visible: Tensor | None = None) -> Tensor:
        # x [B, S, 2H] layer 0's input, residual [B, S, H]; position_ids [B, S] -> last layer's output
        # [B, S, H] (pre-norm)
        cos, sin = self.rotary(position_ids)
        h = self.layers[0](x, residual, cos, sin, position_ids, cache, visible)
        for i, layer in enumerate(self.layers[1:], start=1):
            h = layer(h, cos, sin, position_ids, cache, i, visible)
        return h


def draft_target_ids(d2t: Tensor) -> Tensor:  # [draft_vocab] offsets -> [draft_vocab] target ids
    return torch.arange(len(d2t), device=d2t.device) + d2t


def pick_rows(h: Tensor, rows: Tensor) -> Tensor:  # h [B, S, H], rows [B, R] -> [B, R, H]
    return h.gather(1, rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
