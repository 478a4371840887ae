"""Drafter checkpoints in the speculators P-EAGLE layout: round trips, sharing, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError, DrafterMismatchError, WeightsError
from neuron_peagle.graphs.proposers import DrafterProposer
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.checksums import CHECKSUMS_FILE
from neuron_peagle.models.drafter_io import load_drafter, save_drafter
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.drafter_choice import random_drafter

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir, MAX_LENGTH)


def _drafter(target, **kwargs):
    config = DrafterConfig.for_target(target.config, target.feature_layers, **kwargs)
    return random_drafter(config, MAX_LENGTH, seed=5)


def _drafts(drafter, target, parallel=True, k=3):
    """Run one prefill + one proposal with fixed random inputs; returns the drafts."""
    torch.manual_seed(0)
    proposer = DrafterProposer(drafter, target, 2, parallel=parallel)
    features = torch.randn(2, 16, 3 * target.config.hidden_size)
    ids = torch.randint(0, 200, (2, 16))
    lengths = torch.tensor([9, 16])
    state = SpecState(2, k, 3 * target.config.hidden_size, torch.float32)
    state.pending_features.normal_()
    state.pending_tokens.random_(0, 200)
    state.pending_count.copy_(torch.tensor([1, 3]))
    state.last_position.copy_(lengths)
    with torch.no_grad():
        proposer.prefill(features, ids, lengths)
        return proposer.propose(state, k)


@pytest.mark.parametrize("reduced_vocab", [False, True])
def test_round_trip_in_speculators_layout(tmp_path, target, reduced_vocab):
    kwargs = {"num_layers": 2}
    if reduced_vocab:
        kwargs["draft_vocab_size"] = 500
    drafter = _drafter(target, **kwargs)
    if reduced_vocab:
        drafter.d2t.copy_(torch.arange(500) * 3)  # draft id i -> target id 4i
    save_drafter(drafter, tmp_path, verifier="tiny", verifier_config=target.config, dtype=torch.float32)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle"
    assert config["architectures"] == ["PEagleSpeculator"]
    assert config["eagle_aux_hidden_state_layer_ids"] == list(target.feature_layers)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {"fc.weight", "mask_hidden", "norm.weight", "lm_head.weight", "layers.0.hidden_norm.weight",
            "layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight"} <= set(tensors)
    hidden = target.config.hidden_size
    assert tensors["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert tensors["fc.weight"].shape == (hidden, 3 * hidden)
    assert tensors["mask_hidden"].shape == (1, 1, 3 * hidden)
    assert "embed_tokens.weight" not in tensors  # shared with the target
    assert ("d2t" in tensors) == reduced_vocab

    loaded = load_drafter(tmp_path, target.config, MAX_LENGTH)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_drafts(drafter, target), _drafts(loaded, target))
    assert torch.equal(_drafts(drafter, target, parallel=False), _drafts(loaded, target, parallel=False))


def test_full_embedding_checkpoint_loads_the_same(tmp_path, target):
    drafter = _drafter(target)
    save_drafter(drafter, tmp_path, dtype=torch.float32, full_embedding_from=target.embed_tokens.weight)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "mask_embedding" not in tensors and "embed_tokens.weight" in tensors
    loaded = load_drafter(tmp_path, target.config, MAX_LENGTH)
    assert loaded.embed_tokens is not None
    assert torch.equal(_drafts(drafter, target), _drafts(loaded, target))


def test_bf16_checkpoint_is_small_and_close(tmp_path, target):
    drafter = _drafter(target)
    save_drafter(drafter, tmp_path)
    loaded = load_drafter(tmp_path, target.config, MAX_LENGTH)
    assert load_file(str(tmp_path / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16
    assert torch.allclose(loaded.fc.weight, drafter.fc.weight, rtol=1e-2, atol=1e-3)


def _mismatch(target_config: ModelConfig, **changes) -> ModelConfig:
    from dataclasses import replace

    return replace(target_config, **changes)


def test_mismatched_target_is_refused_with_reasons(tmp_path, target):
    save_drafter(_drafter(target), tmp_path)
    with pytest.raises(DrafterMismatchError, match="target_hidden_size is 64, the target's hidden size 128"):
        load_drafter(tmp_path, _mismatch(target.config, hidden_size=128, head_dim=16), MAX_LENGTH)
    with pytest.raises(DrafterMismatchError, match="vocab_size is 49152, the target's vocabulary 1000"):
        load_drafter(tmp_path, _mismatch(target.config, vocab_size=1000), MAX_LENGTH)
    with pytest.raises(DrafterMismatchError, match=r"eagle_aux_hidden_state_layer_ids \[.*\] are not all layers of a "
                       "2-layer target"):
        load_drafter(tmp_path, _mismatch(target.config, num_hidden_layers=2), MAX_LENGTH)


def test_corrupt_and_incomplete_checkpoints(tmp_path, target):
    save_drafter(_drafter(target), tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    with pytest.raises(WeightsError, match="model.safetensors has sha256 .* modified or corrupted since it was saved"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)
    (tmp_path / CHECKSUMS_FILE).unlink()  # no record (another tool's drafter): the reader still refuses it
    with pytest.raises(WeightsError, match="cannot read"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)
    weights.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    config["speculators_model_type"] = "medusa"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="expected 'peagle'"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)


def test_save_records_checksums_and_a_file_edited_after_saving_is_refused(tmp_path, target):
    save_drafter(_drafter(target), tmp_path)
    record = json.loads((tmp_path / CHECKSUMS_FILE).read_text())
    assert set(record) == {"config.json", "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["norm.weight"] = tensors["norm.weight"] + 1  # still a valid checkpoint, just not the saved one
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as info:
        load_drafter(tmp_path, target.config, MAX_LENGTH)
    message = str(info.value)
    assert "model.safetensors has sha256" in message and "expected " + record["model.safetensors"][:16] in message
    assert "modified or corrupted since it was saved" in message
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model\.safetensors is missing"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)


def test_saving_again_rewrites_the_record(tmp_path, target):
    save_drafter(_drafter(target), tmp_path)
    save_drafter(_drafter(target, num_layers=2), tmp_path)
    assert load_drafter(tmp_path, target.config, MAX_LENGTH).config.num_layers == 2


@pytest.mark.parametrize("garbage", ["not json at all", '["model.safetensors"]', '{"model.safetensors": 1}'])
def test_a_garbage_checksum_record_is_refused_naming_it(tmp_path, target, garbage):
    save_drafter(_drafter(target), tmp_path)
    (tmp_path / CHECKSUMS_FILE).write_text(garbage)
    with pytest.raises(WeightsError, match=r"checksums\.json: .*corrupt"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)


def test_a_drafter_without_checksums_loads(tmp_path, target):
    drafter = _drafter(target)
    save_drafter(drafter, tmp_path, dtype=torch.float32)
    (tmp_path / CHECKSUMS_FILE).unlink()  # as another tool writes a drafter
    loaded = load_drafter(tmp_path, target.config, MAX_LENGTH)
    assert torch.equal(loaded.fc.weight, drafter.fc.weight)


def test_a_nan_weight_is_refused_naming_the_tensor(tmp_path, target):
    save_drafter(_drafter(target), tmp_path)
    (tmp_path / CHECKSUMS_FILE).unlink()  # written by hand, as another tool would: no record
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor layers\.0\.mlp\.down_proj\.weight holds NaN "
                                           r"or inf values; the checkpoint is corrupt"):
        load_drafter(tmp_path, target.config, MAX_LENGTH)
