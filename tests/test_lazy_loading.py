"""The target built on the meta device and read lazily (models/checkpoint.py): each tensor straight into
the build's dtype, equal bit for bit to reading it in float32 and casting; a rank reads only the slices
it keeps (the parallel plan's `LayerShard`), MXFP4 experts dequantized per shard; every check before any
weight is read; memory counted from the meta model as the loader makes it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model
from neuron_peagle import memory
from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.errors import ConfigError, WeightsError
from neuron_peagle.models import checkpoint as checkpoint_module
from neuron_peagle.models.checkpoint import SafetensorsDir
from neuron_peagle.models.target import TargetModel
from neuron_peagle.parallel import TensorParallel
from test_moe import _mxfp4_copy


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    """gpt-oss: biases on q/k/v/o and the experts, sinks, a router; 12 heads, 6 KV heads and 6 experts split
    over 2 and 3 ranks."""
    return save_tiny_model(tmp_path_factory.mktemp("oss") / "model", "gpt_oss", vocab_size=64, num_hidden_layers=2,
                           hidden_size=96, num_attention_heads=12, num_key_value_heads=6, num_local_experts=6)


def _copy_as(source, dest, dtype):
    """The model directory with every floating tensor stored in `dtype`."""
    shutil.copytree(source, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    save_file({n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("stored, dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_each_tensor_is_read_straight_into_the_dtype_as_a_float32_load_then_cast_gives(tiny_llama_dir, tmp_path,
                                                                                       stored, dtype):
    model_dir = _copy_as(tiny_llama_dir, tmp_path / "m", stored)
    direct = TargetModel.from_pretrained(model_dir, 32, dtype)
    via_float32 = TargetModel.from_pretrained(model_dir, 32, torch.float32)
    angles = via_float32.rotary.cos
    via_float32 = via_float32.to(dtype)
    for name, param in _params(via_float32).items():
        got = _params(direct)[name]
        assert got.dtype == dtype and torch.equal(got, param), name
    assert direct.rotary.cos.dtype == torch.float32  # the angles stay float32
    assert torch.equal(direct.rotary.cos, angles)


def test_chunked_reads_of_large_tensors_give_the_same_tensor(tiny_llama_dir, monkeypatch):
    whole = SafetensorsDir.open(tiny_llama_dir).read("model.embed_tokens.weight", range(3, 900), range(5, 60),
                                                      torch.bfloat16)
    monkeypatch.setattr(checkpoint_module, "CHUNK_BYTES", 1000)  # a few rows per chunk
    reader = SafetensorsDir.open(tiny_llama_dir)
    chunked = reader.read("model.embed_tokens.weight", range(3, 900), range(5, 60), torch.bfloat16)
    assert torch.equal(chunked, whole) and chunked.shape == (897, 55)
    assert not reader._open  # every file mapping let go


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_reads_only_its_slices_and_holds_them(gpt_oss_dir, ranks, monkeypatch):
    whole = TargetModel.from_pretrained(gpt_oss_dir, 32)
    hf = load_file(str(gpt_oss_dir / "model.safetensors"))
    read = {}
    original = SafetensorsDir.read

    def counting(self, name, rows=None, cols=None, dtype=None):
        out = original(self, name, rows, cols, dtype)
        read[name] = read.get(name, 0) + out.numel()
        return out

    monkeypatch.setattr(SafetensorsDir, "read", counting)
    total = sum(t.numel() for t in hf.values())
    for rank in range(ranks):
        read.clear()
        model = TargetModel.from_pretrained(gpt_oss_dir, 32, shard=TensorParallel(ranks, rank).shard)
        assert sum(read.values()) < total * 0.75  # the experts and the attention's heads are split
        heads, experts = 12 // ranks, 6 // ranks
        for i, (mine, full) in enumerate(zip(model.layers, whole.layers)):
            attn, mlp = mine.self_attn, mine.mlp
            assert (attn.num_heads, mlp.experts.held) == (heads, range(rank * experts, (rank + 1) * experts))
            assert int(mlp.experts.first_expert) == rank * experts  # data, so every rank's graph is the same
            q = slice(rank * heads * 16, (rank + 1) * heads * 16)
            assert torch.equal(attn.o_proj.weight, full.self_attn.o_proj.weight[:, q])
            assert torch.equal(attn.qkv_proj.weight[:heads * 16], full.self_attn.qkv_proj.weight[q])
            assert torch.equal(attn.sinks, full.self_attn.sinks[rank * heads:(rank + 1) * heads])
            # o's bias joins the sum once: on rank 0
            assert torch.equal(attn.o_proj.bias, full.self_attn.o_proj.bias if rank == 0
                               else torch.zeros_like(full.self_attn.o_proj.bias))
            assert torch.equal(mlp.router.weight, full.mlp.router.weight)  # the router is whole on every rank
            for name, param in mlp.experts.named_parameters():
                assert torch.equal(param, getattr(full.mlp.experts, name)[mlp.experts.held.start:mlp.experts.held.stop])
            assert read[f"model.layers.{i}.mlp.experts.down_proj"] == hf[f"model.layers.{i}.mlp.experts.down_proj"].numel() // ranks


def test_mxfp4_experts_are_dequantized_per_shard_bit_for_bit(gpt_oss_dir, tmp_path):
    quantized, _ = _mxfp4_copy(gpt_oss_dir, tmp_path / "mxfp4")
    whole = TargetModel.from_pretrained(quantized, 32, torch.bfloat16)
    mine = TargetModel.from_pretrained(quantized, 32, torch.bfloat16, shard=TensorParallel(3, 1).shard)
    for full, part in zip(whole.layers, mine.layers):
        for name in ("gate_up", "down"):
            assert torch.equal(getattr(part.mlp.experts, name), getattr(full.mlp.experts, name)[2:4]), name


def _read_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(SafetensorsDir, "read", refuse)


def test_every_problem_is_named_before_any_weight_is_read(tiny_llama_dir, tmp_path, monkeypatch):
    model_dir = _copy_as(tiny_llama_dir, tmp_path / "m", torch.float32)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"][:, :-2].clone()
    save_file(tensors, str(model_dir / "model.safetensors"))
    _read_nothing(monkeypatch)
    with pytest.raises(WeightsError) as info:
        TargetModel.from_pretrained(model_dir, 32, shard=TensorParallel(2, 1).shard)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "model.layers.0.self_attn.o_proj.weight has shape (64, 62), expected (64, 64)" in str(info.value)


def test_a_truncated_shard_is_refused_naming_it_before_any_weight_is_read(tiny_llama_dir, tmp_path, monkeypatch):
    model_dir = _copy_as(tiny_llama_dir, tmp_path / "m", torch.float32)
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    (model_dir / "model.safetensors").unlink()
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({n: tensors[n] for n in first}, str(model_dir / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in second}, str(model_dir / "model-00002-of-00002.safetensors"))
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{n: "model-00001-of-00002.safetensors" for n in first}, **{n: "model-00002-of-00002.safetensors" for n in second}}}))
    assert torch.equal(TargetModel.from_pretrained(model_dir, 32).norm.weight, tensors["model.norm.weight"])
    last = model_dir / "model-00002-of-00002.safetensors"
    last.write_bytes(last.read_bytes()[:-64])
    _read_nothing(monkeypatch)
    with pytest.raises(WeightsError, match=r"model-00002-of-00002.safetensors: cannot read safetensors file \(truncated"):
        TargetModel.from_pretrained(model_dir, 32)


def test_memory_is_the_meta_models_bytes_per_rank_and_matches_what_loading_makes(gpt_oss_dir):
    config = ModelConfig.from_dir(gpt_oss_dir)
    build = BuildConfig(batch_size=2, max_length=32, prefill_buckets=(16,), dtype="bfloat16")
    for ranks in (1, 2, 3):
        need = memory.estimate(config, build, tp=TensorParallel(ranks))
        model = TargetModel.from_pretrained(gpt_oss_dir, 32, torch.bfloat16, shard=TensorParallel(ranks).shard)
        assert need.weights == memory.parameter_bytes(model)
        # The two slots and the one-row twin a prefill runs on (graphs/slots.py).
        caches = (model.new_cache(rows, memory.SLIDING_STEP_TOKENS) for rows in (2, 1))
        assert need.kv_cache == sum(map(memory.parameter_bytes, caches))
    one, three = (memory.estimate(config, build, tp=TensorParallel(n)) for n in (1, 3))
    assert three.weights < one.weights


def test_an_engine_that_does_not_fit_is_refused_with_its_numbers_before_any_weight_is_read(tiny_llama_dir, monkeypatch):
    from spec_helpers import make_engine

    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    _read_nothing(monkeypatch)
    with pytest.raises(ConfigError, match=r"this engine needs about .* GiB \(weights .*, KV caches .*, while loading "
                                          r".*\), more than the 0.00 GiB of memory available"):
        make_engine(tiny_llama_dir, mode="plain")
