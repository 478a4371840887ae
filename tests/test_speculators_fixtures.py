"""Drafters exactly as the speculators library writes them (tests/fixtures/speculators, made by
scripts/make_speculators_fixtures.py with speculators' own classes, save_pretrained and forward): our
loader reads each, and our Drafter on the recorded inputs gives speculators' recorded logits. What we do
not implement is refused naming the field."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuron_peagle.config import ModelConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.drafter_io import load_drafter, read_drafter_config, save_drafter
from neuron_peagle.models.speculators_calls import eagle3_ttt_logits, peagle_logits
from neuron_peagle.models.speculators_config import LAYER_DEFAULTS
from neuron_peagle.runtime.drafter_choice import check_servable

FIXTURES = Path(__file__).parent / "fixtures" / "speculators"
META = json.loads((FIXTURES / "fixtures.json").read_text())
NAMES = sorted(META["fixtures"])
MAX_LENGTH = 64
ATOL = 1e-4  # float32 rounding of the same arithmetic in another order


def _spec(name: str) -> dict:
    return META["fixtures"][name]["spec"]


def _load(drafter_dir: Path, name: str):
    return load_drafter(drafter_dir, ModelConfig.from_dir(FIXTURES / name / "target"), MAX_LENGTH)


def _logits(drafter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our logits on the fixture's recorded call, and speculators' (both [steps, rows, draft_vocab])."""
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    args = (drafter, io["hidden_states"][0], io["input_ids"][0], io["document_ids"][0])
    with torch.no_grad():
        if _spec(name)["kind"] == "peagle":
            ours = peagle_logits(*args, io["anchor_pos"], io["depth"]).unsqueeze(0)
        else:
            ours = eagle3_ttt_logits(*args, io["position_ids"][0], _spec(name)["ttt_steps"])
    return ours, io["logits"]


def test_fixtures_are_small_and_name_their_maker():
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 1_000_000
    assert META["speculators_version"] == "0.9.0"
    for name in NAMES:
        data = json.loads((FIXTURES / name / "drafter" / "config.json").read_text())
        assert data["speculators_version"] == "0.9.0"  # written by speculators, not by us


@pytest.mark.parametrize("name", NAMES)
def test_loader_matches_speculators_logits(name):
    drafter = _load(FIXTURES / name / "drafter", name)
    ours, theirs = _logits(drafter, name)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # Greedy drafts agree wherever speculators' top logit is not a near tie.
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 10 * ATOL
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_are_read(name):
    spec, config = _spec(name), read_drafter_config(FIXTURES / name / "drafter")
    assert config.layer_type == spec["layer_type"]
    assert config.num_layers == spec["layer"]["num_hidden_layers"]
    assert config.head_dim == spec["layer"]["head_dim"]
    assert config.draft_vocab_size == spec["draft_vocab_size"]
    assert config.feature_layers == tuple(spec["aux_layer_ids"])
    assert config.trained_with == spec["kind"]
    assert config.shares_target_embedding is False  # speculators always saves embed_tokens
    for switch in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        assert getattr(config, switch) == spec.get(switch, False), switch
    if spec["kind"] == "peagle":
        assert config.mask_token_id == spec["mask_token_id"]
    assert (config.rope.rope_type, config.rope.theta) == (
        spec["layer"].get("rope_parameters", {}).get("rope_type", "default"),
        spec["layer"].get("rope_parameters", {}).get("rope_theta", 10000.0))


def test_qwen3_layers_have_per_head_qk_norms():
    drafter = _load(FIXTURES / "peagle_qwen3_3layers" / "drafter", "peagle_qwen3_3layers")
    tensors = load_file(str(FIXTURES / "peagle_qwen3_3layers" / "drafter" / "model.safetensors"))
    for i, layer in enumerate(drafter.layers):
        assert torch.equal(layer.self_attn.q_norm.weight, tensors[f"layers.{i}.self_attn.q_norm.weight"])
        assert torch.equal(layer.self_attn.k_norm.weight, tensors[f"layers.{i}.self_attn.k_norm.weight"])


def test_p_eagle_mask_slots_take_the_trained_mask_token_row():
    drafter = _load(FIXTURES / "peagle_llama" / "drafter", "peagle_llama")
    tensors = load_file(str(FIXTURES / "peagle_llama" / "drafter" / "model.safetensors"))
    assert torch.equal(drafter.mask_embedding, tensors["embed_tokens.weight"][_spec("peagle_llama")["mask_token_id"]])


@pytest.mark.parametrize("name", NAMES)
def test_our_save_loads_back_to_the_same_logits(tmp_path, name):
    drafter = _load(FIXTURES / name / "drafter", name)
    save_drafter(drafter, tmp_path / "ours", verifier="target", dtype=torch.float32)
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert data["speculators_model_type"] == _spec(name)["kind"]
    assert data["transformer_layer_config"]["model_type"] == _spec(name)["layer_type"]
    again, _ = _logits(_load(tmp_path / "ours", name), name)
    ours, _ = _logits(drafter, name)
    assert torch.equal(again, ours)


def test_our_saves_load_in_speculators():
    """The script's record: speculators' from_pretrained loaded what save_drafter wrote and its forward
    reproduced the recorded logits (drafters with a whole embedding table)."""
    results = {r["name"]: r for r in META["save_drafter_in_speculators"]}
    for name in NAMES:
        assert results[name]["loads"] and not results[name]["missing_tensors"], results[name]
        assert results[name]["max_abs_diff_to_recorded_logits"] <= ATOL


def test_layer_defaults_are_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    for model_type, defaults in LAYER_DEFAULTS.items():
        config = transformers.AutoConfig.for_model(model_type)
        for field, value in defaults.items():
            if value is not None and hasattr(config, field):  # Qwen3 has no mlp_bias: never a bias
                assert getattr(config, field) == value, (model_type, field)
    assert transformers.AutoConfig.for_model("llama").num_key_value_heads == 32  # None: num_attention_heads


def _edited(tmp_path: Path, name: str, edit) -> Path:
    """A copy of a fixture's drafter directory with its config.json changed by `edit(data)`."""
    copy = tmp_path / name
    shutil.copytree(FIXTURES / name / "drafter", copy)
    data = json.loads((copy / "config.json").read_text())
    edit(data)
    (copy / "config.json").write_text(json.dumps(data))
    return copy


REFUSALS = [
    ("model_type", lambda d: d["transformer_layer_config"].update(model_type="mistral"),
     "transformer_layer_config.model_type 'mistral' is not supported"),
    ("attention_bias", lambda d: d["transformer_layer_config"].update(attention_bias=True),
     "transformer_layer_config.attention_bias"),
    ("mlp_bias", lambda d: d["transformer_layer_config"].update(mlp_bias=True), "transformer_layer_config.mlp_bias"),
    ("hidden_act", lambda d: d["transformer_layer_config"].update(hidden_act="gelu"),
     "transformer_layer_config.hidden_act"),
    ("sliding", lambda d: d["transformer_layer_config"].update(layer_types=["sliding_attention"] * 3),
     "transformer_layer_config.layer_types"),
    ("use_sliding_window", lambda d: d["transformer_layer_config"].update(use_sliding_window=True),
     "transformer_layer_config.use_sliding_window"),
    ("rope", lambda d: d["transformer_layer_config"].update(rope_parameters={"rope_type": "longrope", "factor": 2.0}),
     "transformer_layer_config.rope_parameters"),
    ("unknown switch", lambda d: d.update(norm_after_everything=True), "norm_after_everything is set"),
    ("both fc norms", lambda d: d.update(norm_before_fc=True, fc_norm=True), "mutually exclusive"),
    ("aux ids", lambda d: d.update(eagle_aux_hidden_state_layer_ids=[1, 2, 3, 4]),
     "eagle_aux_hidden_state_layer_ids must list 3"),
    ("no aux ids", lambda d: d.pop("eagle_aux_hidden_state_layer_ids"), "eagle_aux_hidden_state_layer_ids is missing"),
    ("no mask token", lambda d: d.update(mask_token_id=None), "mask_token_id is missing"),
    ("algorithm", lambda d: d.update(speculators_model_type="dflash"), "speculators_model_type is 'dflash'"),
]


@pytest.mark.parametrize("label, edit, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_unimplemented_settings_are_refused_naming_the_field(tmp_path, label, edit, message):
    copy = _edited(tmp_path, "peagle_qwen3_3layers", edit)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_drafter_config(copy)


def test_missing_layer_fields_take_the_model_types_defaults(tmp_path):
    # A Qwen3 layer config without head_dim is 128 wide per head (Qwen3Config's default), not hidden // heads.
    copy = _edited(tmp_path, "peagle_qwen3_3layers", lambda d: d["transformer_layer_config"].pop("head_dim"))
    assert read_drafter_config(copy).head_dim == 128
    no_type = _edited(tmp_path / "b", "peagle_llama", lambda d: d["transformer_layer_config"].pop("model_type"))
    assert read_drafter_config(no_type).layer_type == "qwen3"  # speculators' default layer config class


def test_inconsistent_t2d_is_refused(tmp_path):
    copy = tmp_path / "drafter"
    shutil.copytree(FIXTURES / "peagle_reduced_vocab" / "drafter", copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["t2d"] = torch.roll(tensors["t2d"], 1)
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ConfigError, match="t2d does not mark"):
        _load(copy, "peagle_reduced_vocab")


def test_step_graphs_refuse_eagle3_norm_output():
    config = read_drafter_config(FIXTURES / "eagle3_fc_norm_norm_output" / "drafter")
    with pytest.raises(ConfigError, match="norm_output"):
        check_servable(dataclasses.replace(config, fc_norm=False))
    check_servable(read_drafter_config(FIXTURES / "peagle_qwen3_3layers" / "drafter"))


@pytest.mark.parametrize("name", ["peagle_llama", "peagle_qwen3_3layers", "peagle_reduced_vocab",
                                  "peagle_norm_before_fc"])
def test_step_graphs_draft_what_the_drafter_computes(name):
    """The parallel proposer (prefill into the drafter's cache, then one pass over the pending pair and
    K-1 mask slots, fused layer-0 input, greedy head through d2t) drafts the argmax of the Drafter
    forward whose logits match speculators'."""
    from types import SimpleNamespace

    from neuron_peagle.graphs.proposers import DrafterProposer
    from neuron_peagle.graphs.spec_state import SpecState
    from neuron_peagle.models.drafter import draft_target_ids

    drafter = _load(FIXTURES / name / "drafter", name)
    c, k, n = drafter.config, 4, 9
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, n, 3 * c.target_hidden_size, generator=generator)
    ids = torch.randint(0, c.vocab_size, (1, n), generator=generator)
    y = int(torch.randint(0, c.vocab_size, (1,), generator=generator))
    proposer = DrafterProposer(drafter, SimpleNamespace(embed_tokens=None), 1, parallel=True)
    state = SpecState(1, k, 3 * c.target_hidden_size, torch.float32)
    state.pending_features[0, -1] = features[0, -1]
    state.pending_tokens[0, -1] = y
    state.last_position.fill_(n)
    with torch.no_grad():
        proposer.prefill(features, ids, torch.tensor([n]))
        drafts = proposer.propose(state, k)[0]

        # The same slots in one Drafter forward: pairs (f_i, t_{i+1}) at positions 0..n-1, then K-1 mask slots.
        tokens = torch.cat([ids[0, 1:], torch.tensor([y]), torch.zeros(k - 1, dtype=torch.long)]).unsqueeze(0)
        is_mask = torch.arange(n + k - 1).unsqueeze(0) >= n
        padded = torch.cat([features, features.new_zeros(1, k - 1, features.shape[-1])], dim=1)
        positions = torch.arange(n + k - 1).unsqueeze(0)
        visible = positions.view(-1, 1) >= positions.view(1, -1)
        logits, _ = drafter(drafter.embed(tokens, is_mask, None), drafter.project(padded, is_mask), positions, None,
                            torch.arange(n - 1, n + k - 1).unsqueeze(0), visible.unsqueeze(0))
    assert torch.equal(drafts, draft_target_ids(drafter.d2t)[logits[0].argmax(-1)])


def test_the_script_makes_these_fixtures_outside_the_project(tmp_path):
    from scripts import make_speculators_fixtures as script

    assert sorted(spec["name"] for spec in script.FIXTURES) == NAMES
    assert [META["fixtures"][spec["name"]]["spec"] for spec in script.FIXTURES] == script.FIXTURES
    assert script.SPECULATORS == META["speculators_version"]
    with pytest.raises(SystemExit, match="inside the project"):
        script.check_venv_location(script.ROOT / ".venv")
    assert script.check_venv_location(tmp_path / "env") == (tmp_path / "env").resolve()
