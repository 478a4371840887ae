"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.errors import (ConfigError, ModelDirError, PromptError, UnsupportedModelError,
                                  WeightsError)
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, max_length=64, prefill_buckets=(16, 32))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_empty_prompt(engine):
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        engine.generate([""], SamplingParams(max_new_tokens=4))


def test_prompt_longer_than_largest_bucket_names_the_bucket(engine):
    with pytest.raises(PromptError, match=r"40 tokens, more than the largest prefill bucket \(32\)"):
        engine.generate([list(range(3, 43))], SamplingParams(max_new_tokens=4))


def test_max_new_tokens_beyond_max_length(engine):
    with pytest.raises(PromptError, match="exceed max_length 64"):
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=62))


def test_bad_prompt_in_a_list_is_caught_before_any_work(engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine.runner, "admit", lambda *args: calls.append(args))
    with pytest.raises(PromptError, match="prompt 3"):
        engine.generate([[5, 6], [7, 8], []], SamplingParams(max_new_tokens=4))
    assert calls == []


def test_token_ids_outside_vocabulary(engine):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.generate([[5, 10**6]], SamplingParams(max_new_tokens=4))


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        make_engine(tmp_path / "nope")


def test_model_dir_without_weights(tmp_path, tiny_llama_dir):
    target = _copy(tiny_llama_dir, tmp_path / "m")
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="no \\*.safetensors"):
        TargetModel.from_pretrained(target, max_length=32)


def test_truncated_safetensors(tmp_path, tiny_llama_dir):
    target = _copy(tiny_llama_dir, tmp_path / "m")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors: cannot read"):
        TargetModel.from_pretrained(target, max_length=32)


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    target = _copy(tiny_llama_dir, tmp_path / "m")
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        TargetModel.from_pretrained(target, max_length=32)


def test_missing_and_misshaped_tensors_are_named(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    target = _copy(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(str(target / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    tensors["model.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(WeightsError) as info:
        TargetModel.from_pretrained(target, max_length=32)
    message = str(info.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.extra.weight" in message
    assert "model.norm.weight has shape (63,), expected (64,)" in message


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, tiny_llama_dir, value):
    from safetensors.torch import load_file, save_file

    target = _copy(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(str(target / "model.safetensors"))
    tensors["model.layers.2.self_attn.k_proj.weight"][0, -1] = value
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor model\.layers\.2\.self_attn\.k_proj\.weight "
                                           r"holds NaN or inf values; the checkpoint is corrupt"):
        TargetModel.from_pretrained(target, max_length=32)


def test_config_missing_field(tmp_path):
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"prefill_buckets": (64, 32)}, "strictly increasing"),
    ({"prefill_buckets": (128, 2048), "max_length": 1024}, "exceeds max_length"),
    ({"dtype": "int8"}, "dtype"),
    ({"backend": "tpu"}, "backend"),
])
def test_build_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BuildConfig(**kwargs)


def test_build_config_round_trips_through_json():
    build = BuildConfig(batch_size=4, max_length=256, prefill_buckets=(32, 128), backend="xla")
    assert BuildConfig.from_dict(json.loads(json.dumps(build.to_dict()))) == build


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="the Neuron SDK is installed")
@pytest.mark.parametrize("backend", ["neuron", "nxd"])  # TorchNeuron (trn2/trn3) and NxD's NEFFs (trn1)
def test_neuron_backends_say_what_to_install(tiny_llama_dir, backend):
    from neuron_peagle.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="Neuron SDK"):
        make_engine(tiny_llama_dir, max_length=64, prefill_buckets=(16,), backend=backend)
