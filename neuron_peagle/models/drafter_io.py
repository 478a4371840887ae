"""Drafter checkpoints in the speculators P-EAGLE layout.

A drafter directory holds `config.json` (`speculators_model_type: "peagle"`, architectures
["PEagleSpeculator"], a `transformer_layer_config` describing the drafter layers, the draft vocabulary
size, the target's feature layer ids and the mask token id) and `model.safetensors` with the
speculators tensor names: fc.weight, layers.N.* (layer 0 with hidden_norm and 2H-wide q/k/v),
norm.weight, lm_head.weight, mask_hidden, optional d2t / t2d, optional embed_tokens.weight.

When the drafter shares the target's embedding (the default, to keep checkpoints small), the learned
mask token embedding is stored as one extra tensor, `mask_embedding`; `save_drafter(...,
full_embedding=True)` writes instead a complete `embed_tokens.weight` with that row patched in, which
other speculators consumers load as they are.

`save_drafter` also writes `checksums.json` (file name -> sha256, neuron_peagle.checksums), last;
`load_drafter` then refuses a file modified or corrupted since. A directory without one (a drafter
saved by another tool) loads unverified; a NaN or inf in any weight is refused either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from neuron_peagle.checksums import record_checksums, verify_checksums
from neuron_peagle.config import DrafterConfig, ModelConfig, RopeConfig, read_config_json
from neuron_peagle.datastore import DATASTORE_FILE
from neuron_peagle.errors import ConfigError
from neuron_peagle.files import atomic_path, atomic_write_text
from neuron_peagle.models.drafter import Drafter, draft_target_ids
from neuron_peagle.models.weights import (check_names_and_shapes, decoder_layer_shapes, export_decoder_layer,
                                          load_decoder_layer, read_safetensors_dir, to_in_out)

SPECULATORS_VERSION = "0.3.0"
WEIGHTS_FILE = "model.safetensors"


def config_to_speculators(config: DrafterConfig, verifier: str = "", verifier_config: ModelConfig | None = None
                          ) -> dict[str, Any]:
    c = config
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope.theta,
        "rope_scaling": None if c.rope.rope_type == "default" else {
            "rope_type": c.rope.rope_type, "factor": c.rope.factor, "low_freq_factor": c.rope.low_freq_factor,
            "high_freq_factor": c.rope.high_freq_factor,
            "original_max_position_embeddings": c.rope.original_max_position_embeddings},
        "max_position_embeddings": verifier_config.max_position_embeddings if verifier_config else 8192,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    return {
        "architectures": ["PEagleSpeculator"],
        "speculators_model_type": "peagle",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer,
        "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": c.norm_before_residual,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(c.feature_layers),
        "mask_token_id": c.mask_token_id,
        "ptd_token_id": c.mask_token_id,
        "para_depths": c.num_speculative_tokens,
        "speculators_config": {
            "algorithm": "peagle",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.num_speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": ["LlamaForCausalLM" if not verifier_config
                                           or verifier_config.architecture == "llama" else "Qwen2ForCausalLM"]},
        },
        # Fields of this library that the speculators layout has no place for.
        "neuron_peagle": {"shares_target_embedding": c.shares_target_embedding, "trained_with": c.trained_with},
    }


def config_from_speculators(data: dict[str, Any], source: str) -> DrafterConfig:
    if data.get("speculators_model_type") not in ("peagle", "eagle3"):
        raise ConfigError(f"{source}: speculators_model_type is {data.get('speculators_model_type')!r}, "
                          "expected 'peagle' (or 'eagle3')")
    try:
        layer = data["transformer_layer_config"]
        ours = data.get("neuron_peagle", {})
        heads = int(layer["num_attention_heads"])
        hidden = int(layer["hidden_size"])
        aux = data.get("eagle_aux_hidden_state_layer_ids")
        if aux is None:
            raise ConfigError(f"{source}: eagle_aux_hidden_state_layer_ids is missing (which target "
                              "layers feed the drafter)")
        mask_id = data.get("mask_token_id", data.get("ptd_token_id"))
        proposal = (data.get("speculators_config", {}).get("proposal_methods") or [{}])[0]
        return DrafterConfig(
            hidden_size=hidden,
            intermediate_size=int(layer["intermediate_size"]),
            num_layers=int(layer.get("num_hidden_layers", 1)),
            num_attention_heads=heads,
            num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
            head_dim=int(layer.get("head_dim") or hidden // heads),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(layer),
            vocab_size=int(layer["vocab_size"]),
            draft_vocab_size=int(data.get("draft_vocab_size") or layer["vocab_size"]),
            target_hidden_size=int(data.get("target_hidden_size") or hidden),
            feature_layers=tuple(aux),
            mask_token_id=int(mask_id if mask_id is not None else int(layer["vocab_size"]) - 1),
            norm_before_residual=bool(data.get("norm_before_residual", False)),
            shares_target_embedding=bool(ours.get("shares_target_embedding", False)),
            trained_with=ours.get("trained_with", "peagle" if data["speculators_model_type"] == "peagle" else "eagle3"),
            num_speculative_tokens=int(proposal.get("speculative_tokens", data.get("para_depths", 7))),
        )
    except KeyError as err:
        raise ConfigError(f"{source}: required field {err.args[0]!r} is missing") from None


def read_drafter_config(drafter_dir: str | Path) -> DrafterConfig:
    data, source = read_config_json(drafter_dir, "drafter")
    return config_from_speculators(data, source)


def _expected_shapes(c: DrafterConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (c.hidden_size, 3 * c.target_hidden_size),
        "mask_hidden": (1, 1, 3 * c.target_hidden_size),
        "norm.weight": (c.hidden_size,),
        "lm_head.weight": (c.draft_vocab_size, c.hidden_size),
        "layers.0.hidden_norm.weight": (c.hidden_size,),
    }
    for i in range(c.num_layers):
        hidden_in = 2 * c.hidden_size if i == 0 else c.hidden_size
        shapes.update(decoder_layer_shapes(f"layers.{i}.", hidden_in, c.hidden_size, c.num_attention_heads,
                                           c.num_key_value_heads, c.head_dim, c.intermediate_size))
    if c.shares_target_embedding:
        shapes["mask_embedding"] = (c.hidden_size,)
    else:
        shapes["embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
    if c.reduced_vocab:
        shapes["d2t"] = (c.draft_vocab_size,)
        shapes["t2d"] = (c.vocab_size,)
    return shapes


def load_drafter(drafter_dir: str | Path, target_config: ModelConfig, max_length: int,
                 dtype: torch.dtype = torch.float32) -> Drafter:
    """Load a speculators-format drafter and check it fits the target. Where the directory has a
    checksums.json (every drafter `save_drafter` wrote), each file it lists must be as recorded."""
    path = Path(drafter_dir)
    config = read_drafter_config(path)
    config.check_fits(target_config)
    verify_checksums(path)
    tensors = read_safetensors_dir(path, exclude=(DATASTORE_FILE,))
    optional = {"t2d", "d2t", "verifier_lm_head.weight"}
    if config.shares_target_embedding:
        optional.add("embed_tokens.weight")
    check_names_and_shapes(tensors, _expected_shapes(config), optional, str(path))

    drafter = Drafter(config, max_length)
    t = {name: value.float() if value.is_floating_point() else value for name, value in tensors.items()}
    with torch.no_grad():
        drafter.fc.weight.copy_(to_in_out(t["fc.weight"]))
        drafter.mask_hidden.copy_(t["mask_hidden"].reshape(-1))
        drafter.norm.weight.copy_(t["norm.weight"])
        drafter.lm_head.weight.copy_(to_in_out(t["lm_head.weight"]))
        drafter.layers[0].hidden_norm.weight.copy_(t["layers.0.hidden_norm.weight"])
        for i, layer in enumerate(drafter.layers):
            load_decoder_layer(layer, t, f"layers.{i}.")
        if config.shares_target_embedding:
            drafter.mask_embedding.copy_(t["mask_embedding"])
        else:
            drafter.embed_tokens.weight.copy_(t["embed_tokens.weight"])
            drafter.mask_embedding.copy_(t["embed_tokens.weight"][config.mask_token_id])
        if config.reduced_vocab:
            drafter.d2t.copy_(t["d2t"].long())
            check_draft_vocab(drafter.d2t, config.vocab_size, str(path))
    drafter.to(dtype)
    drafter.rotary.float()
    return drafter


def check_draft_vocab(d2t: torch.Tensor, vocab_size: int, source: str) -> None:
    target_ids = draft_target_ids(d2t)
    if bool((target_ids < 0).any() or (target_ids >= vocab_size).any()):
        raise ConfigError(f"{source}: d2t maps draft ids outside the target vocabulary")
    if len(set(target_ids.tolist())) != len(d2t):
        raise ConfigError(f"{source}: d2t maps two draft ids to the same target id")


def drafter_state(drafter: Drafter, target_embedding: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The drafter's tensors under speculators names (what `save_drafter` writes)."""
    c = drafter.config
    state = {
        "fc.weight": drafter.fc.weight.t(),
        "mask_hidden": drafter.mask_hidden.reshape(1, 1, -1),
        "norm.weight": drafter.norm.weight,
        "lm_head.weight": drafter.lm_head.weight.t(),
        "layers.0.hidden_norm.weight": drafter.layers[0].hidden_norm.weight,
    }
    for i, layer in enumerate(drafter.layers):
        state.update(export_decoder_layer(layer, f"layers.{i}."))
    if drafter.embed_tokens is not None:
        state["embed_tokens.weight"] = drafter.embed_tokens.weight
    elif target_embedding is not None:
        full = target_embedding.detach().clone()
        full[c.mask_token_id] = drafter.mask_embedding.detach()
        state["embed_tokens.weight"] = full
    else:
        state["mask_embedding"] = drafter.mask_embedding
    out = {name: value.detach().to(dtype).contiguous() for name, value in state.items()}
    if c.reduced_vocab:
        out["d2t"] = drafter.d2t.detach().cpu().long()
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[torch.arange(c.draft_vocab_size) + drafter.d2t.cpu()] = True
        out["t2d"] = t2d
    return {name: value.cpu() for name, value in out.items()}


def save_drafter(drafter: Drafter, out_dir: str | Path, verifier: str = "",
                 verifier_config: ModelConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                 full_embedding_from: torch.Tensor | None = None) -> Path:
    """Write model.safetensors, config.json and, last, checksums.json (their sha256, which
    `load_drafter` verifies; entries of other files already recorded there, such as a datastore, are
    kept), each file whole or not at all. With `full_embedding_from` (the target's embedding table) the
    checkpoint carries a complete embed_tokens.weight and no extension tensor."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    config = drafter.config
    if full_embedding_from is not None:
        from dataclasses import replace

        config = replace(config, shares_target_embedding=False)
    data = config_to_speculators(config, verifier, verifier_config)
    state = drafter_state(drafter, full_embedding_from, dtype)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(path / "config.json", json.dumps(data, indent=2) + "\n")
    # Last: a save interrupted before this leaves files that no record vouches for, never a record of
    # files that were not written.
    record_checksums(path, (WEIGHTS_FILE, "config.json"))
    return path
