"""The half of `scripts/make_speculators_fixtures.py` that runs inside the throw-away environment where the
speculators library is installed: it imports torch, transformers and speculators only, never
neuron_peagle.

    python speculators_fixture_worker.py make SPECS_JSON OUT_DIR
        For each fixture spec: a tiny drafter built with speculators' own config and model classes,
        random weights from a fixed seed, saved with speculators' own `save_pretrained` into
        OUT_DIR/NAME/drafter, loaded back with speculators' `from_pretrained`, and the logits of
        speculators' own `forward` on fixed random inputs written to OUT_DIR/NAME/io.safetensors.
        speculators' loader reads the verifier named in the drafter's config (Eagle3DraftModel's
        `load_verifier_weights` reads its config.json even where the name is null, so a drafter
        without one does not load): each fixture names "target", a tiny target directory
        OUT_DIR/NAME/target (config.json and the embedding, head and final norm speculators reads),
        which is resolved from OUT_DIR/NAME as the working directory.

    python speculators_fixture_worker.py check DIRS_JSON OUT_JSON
        For each drafter directory (written by neuron_peagle's `save_drafter`), whether speculators'
        `from_pretrained` loads it, which checkpoint tensors it ignored and which of its own it did not
        find, and the logits of speculators' forward on the inputs recorded beside it.

The recorded calls (what the tests reproduce with neuron_peagle's Drafter):
  * P-EAGLE: `PEagleDraftModel.forward(hidden_states, input_ids, document_ids,
    verifier_last_hidden_states=..., num_depths=D)` after `torch.manual_seed(cod_seed)`; its COD
    sampling (`generate_cod_sample_indices`) is wrapped to record anchor_pos and depth, and the
    `lm_head` output is recorded by a forward hook (loss_config: speculators' eager "kl_div"): logits [1, E, draft_vocab] for the E sampled
    elements (element e sits at position anchor_pos[e] + depth[e]; depth 0 takes the real token and
    feature of that position, depth > 0 the mask token and mask_hidden).
  * EAGLE-3: `Eagle3DraftModel.forward(hidden_states, input_ids, document_ids, position_ids=...,
    ttt_steps=T)`: the `lm_head` output of every training-time-test step, logits [T, S, draft_vocab].
Attention runs in transformers' "eager" implementation (speculators' default, flex attention, is for
GPUs); the masks are speculators' own.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen3Config

from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.losses import resolve_loss_config
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig
from speculators.models.peagle import core as peagle_core
from speculators.proposals.greedy import GreedyTokenProposalConfig

MODELS = {"peagle": (PEagleSpeculatorConfig, PEagleDraftModel), "eagle3": (Eagle3SpeculatorConfig, Eagle3DraftModel)}
LAYER_CONFIGS = {"llama": LlamaConfig, "qwen3": Qwen3Config}
NOT_SAVED = ("verifier_lm_head.weight", "verifier_norm.weight")  # speculators' _keys_to_ignore_on_save
# P-EAGLE's forward also computes its training loss: the eager implementation (the default, fused, is
# a Triton kernel for GPUs). The recorded logits do not depend on it.
EAGER_LOSS = resolve_loss_config("kl_div", "eager")
VERIFIER = "target"  # the verifier's name in every fixture: a directory beside drafter/


def build_config(spec: dict):
    """The speculators config of one fixture spec (see make_speculators_fixtures.FIXTURES)."""
    layer = LAYER_CONFIGS[spec["layer_type"]](**spec["layer"])
    layer._attn_implementation = "eager"
    config_class, _ = MODELS[spec["kind"]]
    extra = {"mask_token_id": spec["mask_token_id"]} if spec["kind"] == "peagle" else {}
    return config_class(
        transformer_layer_config=layer,
        draft_vocab_size=spec["draft_vocab_size"],
        norm_before_residual=spec.get("norm_before_residual", False),
        norm_before_fc=spec.get("norm_before_fc", False),
        fc_norm=spec.get("fc_norm", False),
        norm_output=spec.get("norm_output", False),
        eagle_aux_hidden_state_layer_ids=spec["aux_layer_ids"],
        speculators_config=SpeculatorsConfig(
            algorithm=spec["kind"],
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=spec["speculative_tokens"])],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=VERIFIER, architectures=[spec["target"]["architectures"][0]]),
        ),
        **extra,
    )


def fill_random(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every floating parameter random, in order of name: norms 1 + 0.2 N(0, 1), matrices N(0, 1/fan_in)
    (so activations stay near unit scale), embeddings and mask_hidden N(0, 1)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 2 and "embed" not in name:
                param.copy_(noise / math.sqrt(param.shape[1]) * (3.0 if "lm_head" in name else 1.0))
            else:
                param.copy_(noise)


def draft_vocabulary(spec: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """t2d [vocab] bool and d2t [draft_vocab] int64 offsets (target id = draft id + d2t[draft id]) for
    a random sorted subset of the target vocabulary."""
    vocab, draft = spec["layer"]["vocab_size"], spec["draft_vocab_size"]
    ids = torch.randperm(vocab, generator=generator)[:draft].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return t2d, ids - torch.arange(draft)


def fixed_inputs(spec: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The recorded call's inputs: random target features, token ids, one document."""
    length, hidden = spec["seq_len"], spec["layer"]["hidden_size"]
    num_aux = len(spec["aux_layer_ids"])
    inputs = {
        "hidden_states": torch.randn(1, length, num_aux * hidden, generator=generator),
        "input_ids": torch.randint(0, spec["layer"]["vocab_size"], (1, length), generator=generator),
        "document_ids": torch.zeros(1, length, dtype=torch.long),
    }
    if spec["kind"] == "peagle":
        inputs["verifier_last_hidden_states"] = torch.randn(1, length, hidden, generator=generator)
    else:
        inputs["position_ids"] = torch.arange(length).unsqueeze(0)
    return inputs


def write_verifier(spec: dict, directory: Path, generator: torch.Generator) -> None:
    """A tiny target directory: its config.json (spec["target"]) and the tensors speculators' loader
    reads from a verifier (embedding, LM head, final norm; random)."""
    target = spec["target"]
    vocab, hidden = target["vocab_size"], target["hidden_size"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(target, indent=2) + "\n")
    save_file({"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator),
               "lm_head.weight": torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden),
               "model.norm.weight": 1.0 + 0.2 * torch.randn(hidden, generator=generator)},
              str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_speculators(directory: Path):
    """speculators' own from_pretrained, from the directory's parent (where the verifier named in its
    config is), with the layers' attention set to "eager" (CPU)."""
    data = json.loads((directory / "config.json").read_text())
    config_class, model_class = MODELS[data["speculators_model_type"]]
    here = Path.cwd()
    os.chdir(directory.parent)
    try:
        config = config_class.from_pretrained(directory.name)
        config.transformer_layer_config._attn_implementation = "eager"
        return model_class.from_pretrained(directory.name, config=config)
    finally:
        os.chdir(here)


def recorded_forward(model, spec: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """speculators' forward on `inputs`; the lm_head outputs (and P-EAGLE's COD sample) it produced."""
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    sampled: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            if spec["kind"] == "peagle":
                original = peagle_core.generate_cod_sample_indices

                def recording(*args, **kwargs):
                    anchor_pos, depth = original(*args, **kwargs)
                    sampled.update(anchor_pos=anchor_pos.clone(), depth=depth.clone())
                    return anchor_pos, depth

                peagle_core.generate_cod_sample_indices = recording
                try:
                    torch.manual_seed(spec["cod_seed"])
                    model(inputs["hidden_states"], inputs["input_ids"], inputs["document_ids"],
                          verifier_last_hidden_states=inputs["verifier_last_hidden_states"],
                          num_depths=spec["num_depths"], loss_config=EAGER_LOSS)
                finally:
                    peagle_core.generate_cod_sample_indices = original
            else:
                model(inputs["hidden_states"], inputs["input_ids"], inputs["document_ids"],
                      position_ids=inputs["position_ids"], ttt_steps=spec["ttt_steps"])
    finally:
        hook.remove()
    return {"logits": torch.cat(captured, dim=0).float().contiguous(), **sampled}


def make_one(spec: dict, out_dir: Path) -> None:
    """One fixture: drafter/ (speculators' save_pretrained) and io.safetensors (inputs, logits)."""
    generator = torch.Generator().manual_seed(spec["seed"])
    _, model_class = MODELS[spec["kind"]]
    model = model_class(build_config(spec))
    fill_random(model, generator)
    if spec["draft_vocab_size"] != spec["layer"]["vocab_size"]:
        model.load_vocab_mappings(*draft_vocabulary(spec, generator))
    drafter_dir = out_dir / spec["name"] / "drafter"
    model.save_pretrained(str(drafter_dir))
    write_verifier(spec, out_dir / spec["name"] / VERIFIER, generator)
    inputs = fixed_inputs(spec, generator)

    loaded = load_speculators(drafter_dir)
    fill_random_unsaved(loaded, generator)
    record = recorded_forward(loaded, spec, inputs)
    save_file({**inputs, **record}, str(out_dir / spec["name"] / "io.safetensors"), metadata={"format": "pt"})


def fill_random_unsaved(model, generator: torch.Generator) -> None:
    """The verifier's head and norm, which speculators does not save (P-EAGLE's forward reads them for
    its loss only; the recorded logits do not depend on them), set so the loss is finite."""
    with torch.no_grad():
        model.verifier_lm_head.weight.copy_(torch.randn(model.verifier_lm_head.weight.shape, generator=generator))
        model.verifier_norm.weight.fill_(1.0)


def check_one(entry: dict) -> dict:
    """Whether speculators loads one save_drafter directory, and its logits on the recorded inputs."""
    directory, spec = Path(entry["dir"]), entry["spec"]
    result: dict = {"name": entry["name"], "fixture": entry["fixture"]}
    try:
        model = load_speculators(directory)
    except Exception as err:  # any failure of speculators' loader is the finding to record
        result.update(loads=False, error=f"{type(err).__name__}: {err}"[:500])
        return result
    file_names = set(load_file(str(directory / "model.safetensors")))
    own = set(model.state_dict()) - set(NOT_SAVED)
    result.update(loads=True, ignored_tensors=sorted(file_names - own),
                  missing_tensors=sorted(own - file_names - set(model._keys_to_ignore_on_load_missing)),
                  missing_but_optional=sorted((own - file_names) & set(model._keys_to_ignore_on_load_missing)),
                  nan_parameters=sorted(n for n, p in model.state_dict().items()
                                        if p.is_floating_point() and bool(p.isnan().any()) and n not in NOT_SAVED))
    if result["missing_but_optional"]:
        # speculators 0.9.0 leaves a tensor missing from the file as torch.empty memory; load_verifier_weights
        # replaces embed_tokens by the verifier's only where that memory happens to hold a NaN.
        result["note"] = ("not run: speculators leaves the missing tensors uninitialized (it takes the verifier's "
                          "embedding only where the uninitialized memory holds a NaN), so its logits are not "
                          "reproducible")
        return result
    if entry.get("io"):
        fill_random_unsaved(model, torch.Generator().manual_seed(0))
        tensors = load_file(entry["io"])
        inputs = {k: v for k, v in tensors.items() if k not in ("logits", "anchor_pos", "depth")}
        result["speculators_model_type"] = model.config.speculators_model_type
        if result["speculators_model_type"] != spec["kind"]:
            result["note"] = f"written as {result['speculators_model_type']!r}, made as {spec['kind']!r}: not run"
            return result
        record = recorded_forward(model, spec, inputs)
        save_file(record, str(directory.parent / f"{directory.name}.speculators_logits.safetensors"))
        result["logits_file"] = str(directory.parent / f"{directory.name}.speculators_logits.safetensors")
    return result


def main(argv: list[str]) -> int:
    command, source, destination = argv
    if command == "make":
        out_dir = Path(destination)
        for spec in json.loads(Path(source).read_text()):
            make_one(spec, out_dir)
            print(f"made {spec['name']}", flush=True)
        return 0
    if command == "check":
        results = [check_one(entry) for entry in json.loads(Path(source).read_text())]
        Path(destination).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    print(f"unknown command {command!r} (make | check)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
