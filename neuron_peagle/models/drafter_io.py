"""Drafter checkpoints in the speculators P-EAGLE / EAGLE-3 layout.

A drafter directory holds `config.json` (speculators' layout, read and written by
`speculators_config.py`) and `model.safetensors` with the speculators tensor names: fc.weight,
optional input_norm.weight (norm_before_fc) or fc_norm.N.weight (fc_norm), layers.N.* (layer 0 with
hidden_norm and 2H-wide q/k/v; self_attn.q_norm / k_norm in Qwen3 layers), norm.weight,
lm_head.weight, mask_hidden (P-EAGLE), optional d2t / t2d, embed_tokens.weight.

speculators saves the whole embed_tokens.weight (P-EAGLE trains it: the mask slots take the mask
token's row). When one of our drafters shares the target's embedding (the default, to keep
checkpoints small), the learned mask token embedding is stored instead as one extra tensor,
`mask_embedding`; `save_drafter(..., full_embedding_from=target_embedding)` writes a complete
`embed_tokens.weight` with that row patched in, which speculators and vLLM load as they are.

`save_drafter` also writes `checksums.json` (file name -> sha256, neuron_peagle.checksums), last;
`load_drafter` then refuses a file modified or corrupted since. A directory without one (a drafter
saved by another tool) loads unverified; a NaN or inf in any weight is refused either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from neuron_peagle.checksums import record_checksums, verify_checksums
from neuron_peagle.config import DrafterConfig, ModelConfig, read_config_json
from neuron_peagle.datastore import DATASTORE_FILE
from neuron_peagle.errors import ConfigError
from neuron_peagle.files import atomic_path, atomic_write_text
from neuron_peagle.models.checkpoint import TensorDict
from neuron_peagle.models.drafter import Drafter, draft_target_ids, drafter_layer_config
from neuron_peagle.models.speculators_config import SPECULATORS_VERSION, config_from_speculators, config_to_speculators
from neuron_peagle.models.weights import (check_names_and_shapes, decoder_layer_shapes, export_decoder_layer,
                                          load_decoder_layer, read_safetensors_dir)

__all__ = ["SPECULATORS_VERSION", "WEIGHTS_FILE", "config_from_speculators", "config_to_speculators", "load_drafter",
           "read_drafter_config", "save_drafter"]

WEIGHTS_FILE = "model.safetensors"


def read_drafter_config(drafter_dir: str | Path) -> DrafterConfig:
    data, source = read_config_json(drafter_dir, "drafter")
    return config_from_speculators(data, source)


def _expected_shapes(c: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    features = 3 * c.target_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (c.hidden_size, features),
        "mask_hidden": (1, 1, features),
        "norm.weight": (c.hidden_size,),
        "lm_head.weight": (c.draft_vocab_size, c.hidden_size),
        "layers.0.hidden_norm.weight": (c.hidden_size,),
    }
    if c.norm_before_fc:
        shapes["input_norm.weight"] = (features,)
    if c.fc_norm:
        shapes.update({f"fc_norm.{i}.weight": (c.target_hidden_size,) for i in range(3)})
    for i in range(c.num_layers):
        shapes.update(decoder_layer_shapes(f"layers.{i}.", drafter_layer_config(c, first=i == 0)))
    if c.shares_target_embedding:
        shapes["mask_embedding"] = (c.hidden_size,)
    else:
        shapes["embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
    if c.reduced_vocab:
        shapes["d2t"] = (c.draft_vocab_size,)
        shapes["t2d"] = (c.vocab_size,)
    return shapes


def _optional_names(c: DrafterConfig, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names a checkpoint may hold or leave out: identity d2t / t2d of a full draft vocabulary (speculators
    accepts them), a verifier head, the embedding of a drafter that shares the target's, and the
    mask_hidden that an EAGLE-3 drafter (no mask slots) does not have."""
    optional = {"verifier_lm_head.weight"} | (set() if c.reduced_vocab else {"t2d", "d2t"})
    if c.shares_target_embedding:
        optional.add("embed_tokens.weight")
    if c.trained_with == "eagle3" and "mask_hidden" not in tensors:
        optional.add("mask_hidden")
    return optional


def load_drafter(drafter_dir: str | Path, target_config: ModelConfig, max_length: int,
                 dtype: torch.dtype = torch.float32) -> Drafter:
    """Load a speculators-format drafter and check it fits the target. Where the directory has a
    checksums.json (every drafter `save_drafter` wrote), each file it lists must be as recorded."""
    path = Path(drafter_dir)
    config = read_drafter_config(path)
    config.check_fits(target_config)
    verify_checksums(path)
    tensors = read_safetensors_dir(path, exclude=(DATASTORE_FILE,))
    optional = _optional_names(config, tensors)
    expected = {name: shape for name, shape in _expected_shapes(config).items()
                if name in tensors or name not in optional}
    check_names_and_shapes(tensors, expected, optional, str(path))

    drafter = Drafter(config, max_length)
    t = {name: value.float() if value.is_floating_point() else value for name, value in tensors.items()}
    with torch.no_grad():
        _load_weights(drafter, t)
        if config.reduced_vocab:
            drafter.d2t.copy_(t["d2t"].long())
            check_draft_vocab(drafter.d2t, t["t2d"], config.vocab_size, str(path))
    drafter.to(dtype)
    drafter.rotary.float()
    return drafter


def _load_weights(drafter: Drafter, t: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's float32 tensors `t` (names checked) into the drafter's fused layout."""
    config = drafter.config
    checkpoint = TensorDict(t, "drafter")
    drafter.fc.weight.copy_(t["fc.weight"])
    if "mask_hidden" in t:
        drafter.mask_hidden.copy_(t["mask_hidden"].reshape(-1))
    if drafter.input_norm is not None:
        drafter.input_norm.weight.copy_(t["input_norm.weight"])
    for i, norm in enumerate(drafter.fc_norm or ()):
        norm.weight.copy_(t[f"fc_norm.{i}.weight"])
    drafter.norm.weight.copy_(t["norm.weight"])
    drafter.lm_head.weight.copy_(t["lm_head.weight"])
    drafter.layers[0].hidden_norm.weight.copy_(t["layers.0.hidden_norm.weight"])
    for i, layer in enumerate(drafter.layers):
        load_decoder_layer(layer, checkpoint, f"layers.{i}.", torch.float32)
    if config.shares_target_embedding:
        drafter.mask_embedding.copy_(t["mask_embedding"])
    else:
        drafter.embed_tokens.weight.copy_(t["embed_tokens.weight"])
        drafter.mask_embedding.copy_(t["embed_tokens.weight"][config.mask_token_id])


def check_draft_vocab(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int, source: str) -> None:
    """d2t (target id = draft id + d2t[draft id]) must map into the vocabulary, one to one, and t2d
    [vocab] must mark exactly the target ids it maps to (as speculators builds both)."""
    target_ids = draft_target_ids(d2t)
    if bool((target_ids < 0).any() or (target_ids >= vocab_size).any()):
        raise ConfigError(f"{source}: d2t maps draft ids outside the target vocabulary")
    if len(set(target_ids.tolist())) != len(d2t):
        raise ConfigError(f"{source}: d2t maps two draft ids to the same target id")
    marked = torch.zeros(vocab_size, dtype=torch.bool)
    marked[target_ids.cpu()] = True
    if not torch.equal(t2d.cpu().bool(), marked):
        raise ConfigError(f"{source}: t2d does not mark the target ids d2t maps the draft vocabulary to")


def drafter_state(drafter: Drafter, target_embedding: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The drafter's tensors under speculators names (what `save_drafter` writes)."""
    c = drafter.config
    state = {
        "fc.weight": drafter.fc.weight,
        **({"input_norm.weight": drafter.input_norm.weight} if drafter.input_norm is not None else {}),
        **{f"fc_norm.{i}.weight": norm.weight for i, norm in enumerate(drafter.fc_norm or ())},
        "mask_hidden": drafter.mask_hidden.reshape(1, 1, -1),
        "norm.weight": drafter.norm.weight,
        "lm_head.weight": drafter.lm_head.weight,
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
