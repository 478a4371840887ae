"""A drafter's config.json in the layout of the speculators library (release SPECULATORS_VERSION), read
into a DrafterConfig and written from one.

What speculators writes (its Eagle3SpeculatorConfig / PEagleSpeculatorConfig, saved by transformers'
`save_pretrained`; tests/fixtures/speculators holds drafters it wrote):

  speculators_model_type        "peagle" | "eagle3"
  transformer_layer_config      a transformers config of the drafter's decoder layers, "llama" or
                                "qwen3" (no model_type: a Qwen3 config). A field left out takes that
                                config class's default (LAYER_DEFAULTS), as speculators' own loader
                                fills it in; num_hidden_layers is the drafter's layer count.
  draft_vocab_size              the LM head's rows (d2t / t2d tensors where below vocab_size)
  norm_before_residual, norm_before_fc, fc_norm, norm_output   switches (see DrafterConfig)
  target_hidden_size            null: the drafter's hidden size
  eagle_aux_hidden_state_layer_ids   the target layers whose hidden states are the features
  mask_token_id                 P-EAGLE: the token whose embedding every mask slot takes
  speculators_config            algorithm, proposal_methods[0].speculative_tokens, verifier

A layer setting or switch this library does not implement is refused with a ConfigError naming the
field, never ignored. Fields of this library that the layout has no place for live under
"neuron_peagle".
"""

from __future__ import annotations

from typing import Any

from neuron_peagle.config import SUPPORTED_ARCHITECTURES, DrafterConfig, ModelConfig, RopeConfig
from neuron_peagle.errors import ConfigError, UnsupportedModelError

SPECULATORS_VERSION = "0.9.0"  # the release whose layout this reads and writes (tests/fixtures/speculators)
ALGORITHMS = ("peagle", "eagle3")
# The architectures we write (speculators' config classes' own default; its save_pretrained writes the model
# class instead, PEagleDraftModel / Eagle3DraftModel: no reader looks at it).
ARCHITECTURES = {"peagle": "PEagleSpeculator", "eagle3": "Eagle3Speculator"}
LAYER_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' LlamaConfig / Qwen3Config defaults for the fields a drafter reads (a None head_dim is
# hidden_size // num_attention_heads, a None num_key_value_heads is num_attention_heads).
LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 32768},
}
# Top-level fields that only matter to training or to transformers' bookkeeping.
IGNORED_FIELDS = {"embed_requires_grad", "tie_word_embeddings", "dtype", "torch_dtype", "transformers_version",
                  "auto_map", "architectures", "speculators_version", "ptd_token_id", "para_depths"}
SWITCHES = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")


def layer_settings(data: dict[str, Any], source: str) -> dict[str, Any]:
    """transformer_layer_config with the defaults of its model_type filled in, checked for what the
    drafter's layers implement."""
    layer = data.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: transformer_layer_config is missing or not a JSON object")
    model_type = layer.get("model_type") or "qwen3"
    if model_type not in LAYER_DEFAULTS:
        raise ConfigError(f"{source}: transformer_layer_config.model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(LAYER_DEFAULTS)})")
    full = {**LAYER_DEFAULTS[model_type], **{k: v for k, v in layer.items() if v is not None}, "model_type": model_type}
    refuse = [
        ("hidden_act", full["hidden_act"] != "silu", f"{full['hidden_act']!r} (only 'silu' is implemented)"),
        ("attention_bias", bool(full["attention_bias"]), "true (the drafter's projections have no bias)"),
        ("mlp_bias", bool(full["mlp_bias"]), "true (the drafter's MLP has no bias)"),
        ("use_sliding_window", bool(full.get("use_sliding_window")), "true (sliding-window attention is not "
                                                                    "implemented)"),
        ("layer_types", any(t != "full_attention" for t in full.get("layer_types") or ()),
         f"{full.get('layer_types')} (only full attention is implemented)"),
    ]
    for field, refused, why in refuse:
        if refused:
            raise ConfigError(f"{source}: transformer_layer_config.{field} is {why}")
    return full


def _switches(data: dict[str, Any], source: str) -> dict[str, bool]:
    """The known switches, and a refusal of any other top-level field set to true (a switch of a
    speculators release this library does not know)."""
    known = set(SWITCHES) | IGNORED_FIELDS | {"transformer_layer_config", "draft_vocab_size", "target_hidden_size",
                                              "eagle_aux_hidden_state_layer_ids", "mask_token_id",
                                              "speculators_model_type", "speculators_config", "neuron_peagle"}
    unknown = sorted(k for k, v in data.items() if k not in known and v is True)
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} set, a switch "
                          "this library does not implement")
    values = {name: data.get(name, False) for name in SWITCHES}
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    return values


def _feature_layers(data: dict[str, Any], source: str) -> tuple[int, ...]:
    aux = data.get("eagle_aux_hidden_state_layer_ids")
    if aux is None:
        raise ConfigError(f"{source}: eagle_aux_hidden_state_layer_ids is missing (which target layers feed the "
                          "drafter; speculators guesses [2, L // 2, L - 3] from the verifier, this library "
                          "needs them written)")
    if not isinstance(aux, list) or len(aux) != 3 or not all(isinstance(i, int) for i in aux):
        raise ConfigError(f"{source}: eagle_aux_hidden_state_layer_ids must list 3 target layer ids, got {aux!r}")
    return tuple(aux)


def _mask_token_id(data: dict[str, Any], algorithm: str, vocab_size: int, source: str) -> int:
    """P-EAGLE's mask token (our older files also name it ptd_token_id). An EAGLE-3 drafter has none:
    the last token stands in (it drafts sequentially, with no mask slots)."""
    mask_id = data.get("mask_token_id")
    if mask_id is None:
        mask_id = data.get("ptd_token_id")
    if mask_id is None:
        if algorithm == "peagle":
            raise ConfigError(f"{source}: mask_token_id is missing: a P-EAGLE drafter's mask slots take that "
                              "token's embedding")
        return vocab_size - 1
    return int(mask_id)


def config_from_speculators(data: dict[str, Any], source: str) -> DrafterConfig:
    """The DrafterConfig of a speculators config.json (parsed as `data`; `source` names it in errors)."""
    algorithm = data.get("speculators_model_type")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{source}: speculators_model_type is {algorithm!r}, expected 'peagle' (or 'eagle3')")
    layer = layer_settings(data, source)
    switches = _switches(data, source)
    ours = data.get("neuron_peagle") or {}
    try:
        rope = RopeConfig.from_hf(layer)
    except UnsupportedModelError as err:
        raise ConfigError(f"{source}: transformer_layer_config.rope_parameters: {err}") from None
    try:
        heads = int(layer["num_attention_heads"])
        hidden = int(layer["hidden_size"])
        vocab = int(layer["vocab_size"])
        proposal = ((data.get("speculators_config") or {}).get("proposal_methods") or [{}])[0]
        return DrafterConfig(
            hidden_size=hidden,
            intermediate_size=int(layer["intermediate_size"]),
            num_layers=int(layer["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(layer["num_key_value_heads"] or heads),
            head_dim=int(layer["head_dim"] or hidden // heads),
            rms_norm_eps=float(layer["rms_norm_eps"]),
            rope=rope,
            vocab_size=vocab,
            draft_vocab_size=int(data.get("draft_vocab_size") or vocab),
            target_hidden_size=int(data.get("target_hidden_size") or hidden),
            feature_layers=_feature_layers(data, source),
            mask_token_id=_mask_token_id(data, algorithm, vocab, source),
            shares_target_embedding=bool(ours.get("shares_target_embedding", False)),
            trained_with=ours.get("trained_with", algorithm),
            num_speculative_tokens=int(proposal.get("speculative_tokens", data.get("para_depths", 7))),
            layer_type=layer["model_type"],
            **switches,
        )
    except KeyError as err:
        raise ConfigError(f"{source}: required field {err.args[0]!r} is missing") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def _rope_fields(rope: RopeConfig) -> dict[str, Any]:
    """The rope as transformers 5 writes it (rope_parameters) and as 4.x reads it (rope_theta, rope_scaling)."""
    scaling = None if rope.rope_type == "default" else {
        "rope_type": rope.rope_type, "factor": rope.factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings}
    if rope.rope_type == "llama3":
        scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    elif rope.rope_type == "yarn":
        scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate,
                       attention_factor=rope.attention_factor)
    return {"rope_theta": rope.theta, "rope_scaling": scaling,
            "rope_parameters": {"rope_type": rope.rope_type, "rope_theta": rope.theta, **(scaling or {})}}


def layer_config(c: DrafterConfig, max_position_embeddings: int) -> dict[str, Any]:
    """transformer_layer_config of a drafter: every field its layers depend on, written out."""
    layer = {
        "model_type": c.layer_type,
        "architectures": [LAYER_ARCHITECTURES[c.layer_type]],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        **_rope_fields(c.rope),
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "tie_word_embeddings": False,
    }
    if c.layer_type == "llama":
        layer["mlp_bias"] = False
    else:
        layer.update(use_sliding_window=False, layer_types=["full_attention"] * c.num_layers)
    return layer


def config_to_speculators(config: DrafterConfig, verifier: str = "", verifier_config: ModelConfig | None = None
                          ) -> dict[str, Any]:
    """The speculators config.json of a drafter; `verifier` is the target's name or path (written as
    null when empty: speculators resolves a non-null name when it loads the drafter)."""
    c = config
    architectures = {arch: name for name, arch in SUPPORTED_ARCHITECTURES.items()}
    verifier_arch = architectures[verifier_config.architecture] if verifier_config else "LlamaForCausalLM"
    algorithm = c.trained_with  # an EAGLE-3-trained drafter is read by speculators and vLLM as one
    return {
        "architectures": [ARCHITECTURES[algorithm]],
        "speculators_model_type": algorithm,
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config(c, verifier_config.max_position_embeddings if verifier_config
                                                 else 8192),
        "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": c.norm_before_residual,
        "norm_before_fc": c.norm_before_fc,
        "fc_norm": c.fc_norm,
        "norm_output": c.norm_output,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(c.feature_layers),
        "mask_token_id": c.mask_token_id,
        "ptd_token_id": c.mask_token_id,
        "para_depths": c.num_speculative_tokens,
        "speculators_config": {
            "algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.num_speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier or None, "architectures": [verifier_arch]},
        },
        # Fields of this library that the speculators layout has no place for.
        "neuron_peagle": {"shares_target_embedding": c.shares_target_embedding, "trained_with": c.trained_with},
    }
