"""Typed, validated configs: the target model (read from a Hugging Face config.json) and the build.

A `ModelConfig` is what the model code needs and nothing else; a `BuildConfig` fixes every shape of
every traced graph (batch, cache length, prefill buckets, dtype, backend). Both serialise to JSON so
they can be saved next to compiled artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuron_peagle import checks
from neuron_peagle.errors import ConfigError, ModelDirError, NeuronPeagleError, UnsupportedModelError
from neuron_peagle.capabilities import KERNEL_MODES, capabilities_of

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
MOE_ARCHITECTURES = ("qwen3_moe", "gpt_oss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config_json(directory: str | Path, kind: str) -> tuple[dict[str, Any], str]:
    """The parsed config.json of a model or drafter directory, and its path for messages."""
    path = Path(directory)
    if not path.is_dir():
        raise ModelDirError(f"{kind} directory {str(path)!r} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{kind} directory {str(path)!r} has no config.json")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
    return data, str(config_path)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is "default", "llama3" or "yarn" (gpt-oss)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN: the band of dimensions between beta_fast and beta_slow rotations blends extrapolated and
    # interpolated frequencies; cos and sin are scaled by attention_factor.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        # transformers 4.x writes rope_theta + rope_scaling; 5.x writes one rope_parameters dict.
        params = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3", "yarn"):
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: 'default', 'llama3', 'yarn')"
            )
        if rope_type == "default":
            return cls(theta=theta)
        if rope_type == "yarn":
            return cls._yarn(theta, params, hf)
        return cls(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )

    @classmethod
    def _yarn(cls, theta: float, params: dict[str, Any], hf: dict[str, Any]) -> "RopeConfig":
        """YaRN as transformers reads it: factor defaults to max / original positions, attention_factor
        to 0.1 ln(factor) + 1 (mscale / mscale_all_dim variants refused)."""
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise UnsupportedModelError("yarn rope with mscale / mscale_all_dim is not supported")
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError("rope partial_rotary_factor other than 1 is not supported")
        original = int(params["original_max_position_embeddings"])
        factor = float(params.get("factor") or int(hf["max_position_embeddings"]) / original)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return cls(theta=theta, rope_type="yarn", factor=factor, original_max_position_embeddings=original,
                   beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
                   truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts target: a router picks `num_experts_per_tok` of
    `num_experts` SwiGLU experts per token and sums their outputs weighted by its scores.

    - qwen3_moe: scores = softmax over all experts, the top k kept (renormalised when norm_topk_prob);
      no biases; silu(gate) * up.
    - gpt_oss: the top k router logits (router bias), softmax over those k; expert biases; the clamped
      variant (gate <= limit, |up| <= limit, gate * sigmoid(alpha * gate) * (up + 1)).
    """

    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    routing: str  # "softmax_topk" (qwen3_moe) | "topk_softmax" (gpt_oss)
    norm_topk_prob: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"  # "silu" | "clamped_swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or the dense MLP (qwen3_moe mlp_only_layers)

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) must lie in "
                              f"[1, num_experts ({self.num_experts})]")
        if self.expert_intermediate_size <= 0:
            raise ConfigError(f"model config: the experts' intermediate size must be positive, "
                              f"got {self.expert_intermediate_size}")

    @classmethod
    def from_hf(cls, arch: str, hf: dict[str, Any], num_layers: int) -> "MoeConfig":
        if arch == "gpt_oss":
            return cls(num_experts=int(hf["num_local_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                       expert_intermediate_size=int(hf["intermediate_size"]), routing="topk_softmax",
                       router_bias=True, expert_bias=True, activation="clamped_swiglu",
                       swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                       swiglu_limit=float(hf.get("swiglu_limit", 7.0)), sparse_layers=(True,) * num_layers)
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or [])
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        if step < 1 or experts <= 0:
            raise ConfigError(f"model config: num_experts ({experts}) and decoder_sparse_step ({step}) must be >= 1")
        return cls(num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
                   expert_intermediate_size=int(hf["moe_intermediate_size"]), routing="softmax_topk",
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)))


@dataclass(frozen=True)
class ModelConfig:
    """The decoder-only target model: Llama, Qwen2, Qwen3 (dense), Qwen3-MoE or gpt-oss."""

    architecture: str  # SUPPORTED_ARCHITECTURES values: "llama", "qwen2", "qwen3", "qwen3_moe", "gpt_oss"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False  # Qwen3: RMSNorm over every query and key head before rope
    moe: MoeConfig | None = None  # mixture-of-experts MLPs (qwen3_moe, gpt_oss)
    # gpt-oss: which layers attend to the last `sliding_window` positions only ("sliding_attention")
    # and which to all ("full_attention"); empty: all full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_sinks: bool = False  # gpt-oss: a learned logit per head that takes part in the softmax
    # How the checkpoint stores the expert matrices: "mxfp4" (gpt-oss as published; dequantized at load)
    # or None (dense).
    expert_quantization: str | None = None

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend to a sliding window of the last `sliding_window` positions."""
        return tuple(t == "sliding_attention" for t in self.layer_types) or (False,) * self.num_hidden_layers

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedModelError(f"architecture {self.architecture!r} is not supported")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers or any(
                t not in ("sliding_attention", "full_attention") for t in self.layer_types)):
            raise ConfigError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for "
                              f"each of the {self.num_hidden_layers} layers, got {list(self.layer_types)}")
        if any(self.sliding_layers) and (self.sliding_window is None or self.sliding_window < 1):
            raise ConfigError(f"model config: sliding-window layers need a sliding_window >= 1, "
                              f"got {self.sliding_window}")
        if self.expert_quantization == "mxfp4" and (
                self.hidden_size % 32 or self.moe is None or self.moe.expert_intermediate_size % 32):
            raise ConfigError("model config: mxfp4 experts need a hidden size and an expert width that are "
                              f"multiples of 32 (its block), got {self.hidden_size} and "
                              f"{self.moe.expert_intermediate_size if self.moe else None}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def norm_scale_in_float32(self) -> bool:
        """gpt-oss's RMSNorms scale by their weight in float32 and then cast; the others cast first."""
        return self.architecture == "gpt_oss"

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise UnsupportedModelError(
                f"{source}: architectures {archs or '(none)'} / model_type "
                f"{hf.get('model_type')!r} are not supported; this library serves "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        arch = SUPPORTED_ARCHITECTURES[known[0]]
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention (use_sliding_window) is not supported")
        quantization = hf.get("quantization_config")
        method = (quantization.get("quant_method") if isinstance(quantization, dict) else quantization) or None
        if method is not None and not (method == "mxfp4" and arch == "gpt_oss"):
            raise UnsupportedModelError(
                f"{source}: quantized checkpoints ({method}) are not supported (only gpt-oss's mxfp4 experts, "
                "dequantized at load); save a dequantized copy first")
        try:
            whole = _whole_numbers(hf, source)
            hidden = whole(hf["hidden_size"], "hidden_size")
            heads = whole(hf["num_attention_heads"], "num_attention_heads")
            eos = hf.get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=whole(hf["vocab_size"], "vocab_size"),
                hidden_size=hidden,
                intermediate_size=whole(hf["intermediate_size"], "intermediate_size"),
                num_hidden_layers=whole(hf["num_hidden_layers"], "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=whole(hf.get("num_key_value_heads") or heads, "num_key_value_heads"),
                head_dim=whole(hf.get("head_dim") or hidden // heads, "head_dim"),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(hf),
                max_position_embeddings=whole(hf.get("max_position_embeddings", 2048), "max_position_embeddings"),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", arch == "gpt_oss")),
                o_bias=arch != "qwen2" and bool(hf.get("attention_bias", arch == "gpt_oss")),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                eos_token_ids=eos_ids,
                qk_norm=arch in ("qwen3", "qwen3_moe"),
                moe=MoeConfig.from_hf(arch, hf, whole(hf["num_hidden_layers"], "num_hidden_layers")) if arch in MOE_ARCHITECTURES else None,
                layer_types=tuple(hf.get("layer_types") or ()) if arch == "gpt_oss" else (),
                sliding_window=int(hf["sliding_window"]) if arch == "gpt_oss" and hf.get("sliding_window") else None,
                attention_sinks=arch == "gpt_oss",
                expert_quantization=method,
            )
        except KeyError as err:
            raise ConfigError(f"{source}: required field {err.args[0]!r} is missing") from None
        except NeuronPeagleError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{source}: a field has a value of the wrong type ({err})") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """config.json, plus the stop tokens of generation_config.json where the directory has one (Hub
        models often list more end-of-sequence tokens there, e.g. Qwen3's <|im_end|> and <|endoftext|>)."""
        hf, source = read_config_json(model_dir, "model")
        config = cls.from_hf_dict(hf, source=source)
        extra = _generation_eos_ids(Path(model_dir) / "generation_config.json")
        if extra:
            ids = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            config = dataclasses.replace(config, eos_token_ids=ids)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _whole_numbers(hf: dict[str, Any], source: str):
    """A checker of config.json's integer fields: JSON integers only (a string "30" is not read as 30, which
    the tokenizer's own loader would refuse later with a less clear error)."""
    def whole(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        return value

    return whole


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    """eos_token_id of a generation_config.json (an id or a list of ids); () where there is none."""
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"eos_token_id {eos!r}")
        return tuple(ids)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as err:
        raise ConfigError(f"{path}: not a valid generation config ({err})") from None


@dataclass(frozen=True)
class BuildConfig:
    """Every shape the traced graphs are built for, and how they run (dtype, backend, kernels). How an
    engine speculates is neuron_peagle.speculation.SpeculationConfig."""

    batch_size: int = 1
    max_length: int = 1024
    prefill_buckets: tuple[int, ...] = (128, 512)
    dtype: str = "float32"
    backend: str = "eager"
    # Which implementation of the fused draft-pass kernels the graphs call (neuron_peagle.kernels):
    # "auto" resolves to the backend's default (Capabilities.default_kernels).
    kernels: str = "auto"
    # Physical NeuronCores per logical core the graphs and their kernels are built for (neuron_peagle.lnc):
    # "auto" resolves by the backend (Capabilities.lnc_for): 1 off NeuronCores.
    lnc: int | str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.prefill_buckets, (str, bytes)) or not isinstance(self.prefill_buckets, Sequence):
            raise ConfigError(f"prefill_buckets must be a sequence of integers, got {self.prefill_buckets!r}")
        buckets = tuple(checks.integer("prefill_buckets", b) for b in self.prefill_buckets)
        object.__setattr__(self, "prefill_buckets", buckets)
        if self.kernels not in ("auto", *KERNEL_MODES):
            raise ConfigError(f"kernels must be 'auto' or one of {KERNEL_MODES}, got {self.kernels!r}")
        object.__setattr__(self, "kernels", capabilities_of(self.backend).kernels_for(self.kernels))
        object.__setattr__(self, "lnc", capabilities_of(self.backend).lnc_for(self.lnc))
        checks.integer("batch_size", self.batch_size, minimum=1)
        checks.integer("max_length", self.max_length, minimum=2)
        if not buckets:
            raise ConfigError("prefill_buckets must name at least one bucket")
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ConfigError(f"prefill_buckets must be positive and strictly increasing, got {buckets}")
        if buckets[-1] > self.max_length:
            raise ConfigError(
                f"the largest prefill bucket ({buckets[-1]}) exceeds max_length ({self.max_length})"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def state_rows(self) -> int:
        """Rows of every state buffer the graphs hold: the batch's slots, and at batch sizes above 1 the
        one-row twin a prefill runs on before it enters its slot (graphs/slots.py)."""
        return self.batch_size + (self.batch_size > 1)

    def bucket_for(self, length: int) -> int:
        """The smallest prefill bucket that holds `length` tokens."""
        for bucket in self.prefill_buckets:
            if length <= bucket:
                return bucket
        raise ConfigError(f"no bucket holds {length} tokens")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        return checks.dataclass_from_dict(cls, data, "build config fields")


# Drafter decoder layers (speculators' transformer_layer_config.model_type): Llama's, or Qwen3's with
# per-head q/k RMSNorm.
DRAFTER_LAYER_TYPES = ("llama", "qwen3")


@dataclass(frozen=True)
class DrafterConfig:
    """A P-EAGLE (or EAGLE-3) drafter: `fc` over three target feature layers, `num_layers` decoder
    layers of `layer_type` (layer 0 with a 2H input), final norm and LM head over a (possibly reduced)
    draft vocabulary.

    Saved as a speculators-format config (`speculators_model_type: "peagle"`); the fields below are
    read from / written to that layout by `drafter_io.py` (speculators' names in the comments).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int  # == vocab_size when no reduced draft vocabulary is used
    target_hidden_size: int
    feature_layers: tuple[int, ...]  # target layers whose input hidden states are the features
    mask_token_id: int
    norm_before_residual: bool = False
    shares_target_embedding: bool = True  # embed_tokens comes from the target, not the checkpoint
    trained_with: str = "peagle"  # "peagle" (parallel) or "eagle3" (sequential)
    num_speculative_tokens: int = 7  # what it was trained for; a hint, not a limit
    # transformer_layer_config.model_type: "llama", or "qwen3" (an RMSNorm over every query and key head).
    layer_type: str = "llama"
    norm_before_fc: bool = False  # one RMSNorm over the concatenated features before fc (input_norm)
    fc_norm: bool = False  # an RMSNorm over each feature layer's part before fc (fc_norm.N)
    # Eagle 3.1: the final norm's output, not the last layer's, is the hidden state fed back across
    # sequential drafting steps (the logits are lm_head(norm(h)) either way).
    norm_output: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if len(self.feature_layers) != 3:
            raise ConfigError(f"a drafter takes exactly 3 feature layers, got {self.feature_layers}")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(
                f"draft_vocab_size {self.draft_vocab_size} must be in (0, vocab_size={self.vocab_size}]"
            )
        if self.num_layers < 1:
            raise ConfigError(f"a drafter needs at least one layer, got {self.num_layers}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} is outside the vocabulary")
        if self.trained_with not in ("peagle", "eagle3"):
            raise ConfigError(f"trained_with must be 'peagle' or 'eagle3', got {self.trained_with!r}")
        if self.layer_type not in DRAFTER_LAYER_TYPES:
            raise ConfigError(f"layer_type must be one of {DRAFTER_LAYER_TYPES}, got {self.layer_type!r}")
        if self.norm_before_fc and self.fc_norm:
            raise ConfigError("norm_before_fc and fc_norm are mutually exclusive (one norm over all features, "
                              "or one per feature layer)")

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    @property
    def qk_norm(self) -> bool:
        """Whether the layers normalize every query and key head (Qwen3 layers)."""
        return self.layer_type == "qwen3"

    @classmethod
    def for_target(cls, target: ModelConfig, feature_layers: tuple[int, ...], num_layers: int = 1,
                   draft_vocab_size: int | None = None, mask_token_id: int | None = None,
                   intermediate_size: int | None = None, **kwargs: Any) -> "DrafterConfig":
        """A drafter shaped like its target's layers (the usual EAGLE-3 / P-EAGLE choice): Qwen3 layers
        for a Qwen3 target (as speculators trains them), Llama layers otherwise."""
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=intermediate_size or target.intermediate_size,
            num_layers=num_layers,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            head_dim=target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            rope=target.rope,
            vocab_size=target.vocab_size,
            draft_vocab_size=draft_vocab_size or target.vocab_size,
            target_hidden_size=target.hidden_size,
            feature_layers=feature_layers,
            mask_token_id=target.vocab_size - 1 if mask_token_id is None else mask_token_id,
            **{"layer_type": "qwen3" if target.qk_norm else "llama", **kwargs},
        )

    def check_fits(self, target: ModelConfig) -> None:
        """Raise DrafterMismatchError naming every way this drafter does not fit `target`."""
        from neuron_peagle.errors import DrafterMismatchError

        # Each problem names the drafter's config.json field (speculators' names) that does not fit.
        problems = []
        if self.target_hidden_size != target.hidden_size:
            problems.append(f"target_hidden_size is {self.target_hidden_size}, the target's hidden size "
                            f"{target.hidden_size}")
        if self.vocab_size != target.vocab_size:
            problems.append(f"transformer_layer_config.vocab_size is {self.vocab_size}, the target's vocabulary "
                            f"{target.vocab_size}")
        if any(not 0 <= i < target.num_hidden_layers for i in self.feature_layers):
            problems.append(f"eagle_aux_hidden_state_layer_ids {list(self.feature_layers)} are not all layers of a "
                            f"{target.num_hidden_layers}-layer target")
        if self.shares_target_embedding and self.hidden_size != target.hidden_size:
            problems.append(f"it shares the target's embedding but transformer_layer_config.hidden_size "
                            f"{self.hidden_size} differs from the target's {target.hidden_size}")
        if problems:
            raise DrafterMismatchError("the drafter does not fit the target: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
