"""Our target model against transformers' own, on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import edited_model_dir, save_tiny_model
from neuron_peagle.models.layers import bf16_rounded, rounded_float
from neuron_peagle.models.target import TargetModel
from spec_helpers import make_engine


def _compare(model_dir, seq_len: int = 24, batch: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = TargetModel.from_pretrained(model_dir, max_length=128)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq_len), generator=generator)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, positions, ours.new_cache(batch), positions, return_features=True)
    features = torch.cat([ref.hidden_states[i] for i in ours.feature_layers], dim=-1)
    return out, ref, features


@pytest.mark.parametrize("family,tie,rope_scaling", [
    ("llama", True, None),
    ("llama", False, None),
    ("llama", False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ("qwen2", True, None),
    ("qwen2", False, None),
    ("qwen3", True, None),
    ("qwen3", False, None),
])
def test_tiny_models_match_transformers(tmp_path, family, tie, rope_scaling):
    model_dir = save_tiny_model(tmp_path, family, tie=tie, rope_scaling=rope_scaling, seed=3)
    out, ref, features = _compare(model_dir, seq_len=40)
    assert (out.logits - ref.logits).abs().max() <= 1e-3
    assert torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1))
    assert torch.allclose(out.features, features, atol=1e-4, rtol=1e-4)


def test_qwen3_head_norms_are_loaded_and_head_dim_is_its_own(tmp_path):
    model_dir = save_tiny_model(tmp_path, "qwen3", tie=False, seed=4, head_dim=24)
    model = TargetModel.from_pretrained(model_dir, max_length=64)
    attn = model.layers[0].self_attn
    assert model.config.head_dim == 24 and attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 24, 64)
    assert attn.q_norm.weight.shape == (24,) and not torch.equal(attn.q_norm.weight, attn.k_norm.weight)
    assert attn.qkv_proj.bias is None and attn.o_proj.bias is None
    out, ref, _ = _compare(model_dir, seq_len=20)
    assert torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1))


def test_qwen2_biases_are_loaded(tmp_path):
    model_dir = save_tiny_model(tmp_path, "qwen2", tie=False, seed=4)
    model = TargetModel.from_pretrained(model_dir, max_length=64)
    assert model.layers[0].self_attn.qkv_proj.bias is not None
    assert model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0
    assert model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_dir):
    out, ref, features = _compare(default_model_dir, seq_len=48)
    assert (out.logits - ref.logits).abs().max() <= 1e-3
    assert torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1))
    # Hidden states grow large in late layers; compare them relative to their size.
    assert ((out.features - features).abs().max() / features.abs().max()) <= 1e-4


def test_incremental_decode_equals_full_forward(tiny_llama_dir):
    """Prefill part of a sequence, decode the rest one token at a time: same logits as one pass."""
    model = TargetModel.from_pretrained(tiny_llama_dir, max_length=64)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        full = model(ids, positions, model.new_cache(2), positions).logits
        cache = model.new_cache(2)
        head = model(ids[:, :12], positions[:, :12], cache, positions[:, :12]).logits
        steps = [model(ids[:, t:t + 1], positions[:, t:t + 1], cache, torch.zeros(2, 1, dtype=torch.long)).logits
                 for t in range(12, 20)]
    incremental = torch.cat([head] + steps, dim=1)
    assert torch.allclose(incremental, full, atol=1e-4)


@pytest.mark.parametrize("dtype, mode, one_row_float32", [("float32", "plain", True), ("float32", "parallel", False),
                                                         ("bfloat16", "plain", False)])
@pytest.mark.parametrize("row_matmul", ["on", "off"])
def test_cpu_backend_chooses_the_weight_strides_and_the_model_keeps_the_checkpoint_layout(
        tiny_llama_dir, dtype, mode, one_row_float32, row_matmul, monkeypatch):
    """The model holds nn.Linear's [out, in] as loaded (row-major), its tied LM head the embedding itself;
    the eager backend keeps them row-major where the row matmul runs (it reads rows), and without it
    stores float32 weights column-major where a call multiplies one row (plain decoding at batch 1, MKL's
    one-row kernel) and row-major otherwise (a P-EAGLE verify's K+1 rows, and bf16 always), same shapes
    and values, the tied head still the embedding."""
    from neuron_peagle.kernels import cpu_ops

    if row_matmul == "off":
        monkeypatch.setitem(cpu_ops._built, "ops", None)  # as where it cannot be built
    elif cpu_ops.cpu_ops() is None:
        pytest.skip("the row matmul does not run on this CPU")
    column_major = one_row_float32 and row_matmul == "off"
    loaded = TargetModel.from_pretrained(tiny_llama_dir, 64, getattr(torch, dtype))
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.embed_tokens.weight
    linears = {name: m.weight for name, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(w.is_contiguous() for w in linears.values())
    assert loaded.layers[0].self_attn.o_proj.weight.shape == (loaded.config.hidden_size,
                                                               loaded.config.num_attention_heads * loaded.config.head_dim)
    engine = make_engine(tiny_llama_dir, mode=mode, dtype=dtype, max_length=64, prefill_buckets=(16,))
    target = engine.runner.target
    assert target.lm_head.weight is target.embed_tokens.weight
    ours = {name: m.weight for name, m in target.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ours.keys() == linears.keys()
    for name, weight in ours.items():
        assert weight.shape == linears[name].shape and torch.equal(weight, linears[name]), name
        assert (weight.stride(0) == 1 if column_major else weight.is_contiguous()), (name, weight.stride())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kv_writes_put_the_same_bits_where_scatter_puts_them(dtype):
    """As the eager backend writes a KV cache (16-bit ones through an int16 view)."""
    from neuron_peagle.kv_cache import KVCache
    from neuron_peagle.state_writes import StateWrites, use_state_writes

    generator = torch.Generator().manual_seed(0)
    kv = KVCache(1, 3, 2, 40, 8, dtype)
    use_state_writes(kv, StateWrites.IN_PLACE_INT16)
    cache = kv.key_0
    cache.copy_(torch.randn(3, 2, 40, 8, generator=generator).to(dtype))
    expected = cache.clone()
    new = torch.randn(3, 2, 4, 8, generator=generator)  # float32 in, cast to the cache's dtype
    positions = torch.stack([torch.randperm(40, generator=generator)[:4] for _ in range(3)])  # [B, T]
    index = positions.view(3, 1, 4, 1).expand(3, 2, 4, 8)
    kv.write(0, positions, new, new)
    expected.scatter_(2, index, new.to(dtype))
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))  # every bit, NaN-safe
    assert torch.equal(cache.gather(2, index), new.to(dtype))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_qwen3_greedy_generation_equals_transformers(tmp_path, batch_size):
    """Plain and P-EAGLE (a random drafter, K=3, with context lookup) on a tiny Qwen3 decode exactly
    transformers' greedy tokens, batch 1 and 4 with prompts of different lengths."""
    from transformers import AutoModelForCausalLM

    from neuron_peagle.runtime.engine import SamplingParams

    model_dir = save_tiny_model(tmp_path, "qwen3", tie=True, seed=6)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [[5, 9, 13, 40], [7, 300, 11], [900, 901, 902, 903, 904, 905], [31, 32]]
    want = []
    with torch.no_grad():
        for ids in prompts:
            ids_t = torch.tensor([ids])
            out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(ids):].tolist())
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    shapes = dict(batch_size=batch_size, max_length=64, prefill_buckets=(16,))
    for options in (dict(mode="plain"), dict(mode="parallel", num_speculative_tokens=3, lookup_ngram=2)):
        engine = make_engine(model_dir, **shapes, **options)
        assert [o.output_ids for o in engine.generate(prompts, params)] == want, options


def test_a_hub_style_directory_sharded_bf16_with_generation_config_stops(tmp_path):
    """Sharded bf16 safetensors with an index, and generation_config.json's extra stop token: the
    model loads as the single-file one does, and generation stops at the extra token."""
    from transformers import AutoModelForCausalLM

    from neuron_peagle.runtime.engine import SamplingParams

    single = save_tiny_model(tmp_path / "single", "qwen3", tie=False, seed=8)
    hf = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16)
    hub = tmp_path / "hub"
    hf.save_pretrained(hub, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (single / name).is_file():
            (hub / name).write_bytes((single / name).read_bytes())
    assert (hub / "model.safetensors.index.json").is_file() and len(list(hub.glob("*.safetensors"))) > 1
    shapes = dict(mode="plain", max_length=64, prefill_buckets=(16,), dtype="bfloat16")
    params = SamplingParams(max_new_tokens=12)
    first = make_engine(single, **shapes).generate([[5, 9, 13]], SamplingParams(max_new_tokens=12,
                                                                                         ignore_eos=True))[0]
    hub_run = make_engine(hub, **shapes).generate([[5, 9, 13]], SamplingParams(max_new_tokens=12,
                                                                                         ignore_eos=True))[0]
    assert hub_run.output_ids == first.output_ids
    stop_at = first.output_ids[3]
    (hub / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop_at]}))
    stopped = make_engine(hub, **shapes).generate([[5, 9, 13]], params)[0]
    cut = first.output_ids.index(stop_at) + 1
    assert stopped.output_ids == first.output_ids[:cut] and stopped.stats.finish_reason == "stop"


@pytest.mark.parametrize("architecture, model_type", [("MistralForCausalLM", "mistral"),
                                                      ("DeepseekV3ForCausalLM", "deepseek_v3")])
def test_architectures_we_do_not_run_are_refused_naming_them(tmp_path, tiny_llama_dir, capsys, architecture,
                                                             model_type):
    from neuron_peagle.cli import main

    model = edited_model_dir(tiny_llama_dir, tmp_path / "model",
                             lambda c: {**c, "architectures": [architecture], "model_type": model_type})
    assert main(["generate", "hi", "--model", str(model), "--backend", "eager"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and model_type in err and "Qwen3ForCausalLM" in err


def test_a_four_layer_qwen3_drafter_in_speculators_format_drives_exact_generation(tmp_path, capsys):
    """A P-EAGLE drafter with 4 Qwen3 layers, saved in the speculators layout, on a tiny random Qwen3
    target: P-EAGLE's greedy output equals transformers' (a random drafter: few drafts accepted), from
    the API and from `neuron-peagle generate --model QWEN3_DIR --drafter DRAFTER_DIR`."""
    from transformers import AutoModelForCausalLM

    from neuron_peagle.cli import main
    from neuron_peagle.config import DrafterConfig, ModelConfig
    from neuron_peagle.models.drafter_io import read_drafter_config, save_drafter
    from neuron_peagle.models.target import default_feature_layers
    from neuron_peagle.runtime.drafter_choice import random_drafter
    from neuron_peagle.runtime.engine import SamplingParams

    model_dir = save_tiny_model(tmp_path / "qwen3", "qwen3", tie=False, seed=9)
    target = ModelConfig.from_dir(model_dir)
    config = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers), num_layers=4)
    drafter_dir = save_drafter(random_drafter(config, 128, seed=2), tmp_path / "drafter")
    saved = json.loads((drafter_dir / "config.json").read_text())
    assert saved["transformer_layer_config"]["model_type"] == "qwen3"
    assert saved["transformer_layer_config"]["num_hidden_layers"] == 4 and read_drafter_config(drafter_dir).qk_norm

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = [5, 9, 13, 40, 41]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    engine = make_engine(model_dir, drafter_dir, num_speculative_tokens=4, max_length=64,
                                    prefill_buckets=(16,))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert out.output_ids == want and out.stats.acceptance_length >= 1.0

    assert main(["generate", "Hello", "--model", str(model_dir), "--drafter", str(drafter_dir), "--json",
                 "--backend", "eager", "--max-length", "64", "--prefill-buckets", "32", "--max-new-tokens", "8",
                 "--no-chat-template", "-k", "4"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(record["output_ids"]) >= 1 and str(drafter_dir) in record["drafter"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64), st.integers(0, 0xFFFF))
def test_bf16_rounding_by_bits_is_the_cast(values, low_bits):
    """The norm's input is rounded by bits (a cast no compiler elides): the values a float32 -> bf16 cast
    gives, every low half included (exact ties go to even, overflow to infinity); no change to values
    bf16 already holds; float32 models are not rounded."""
    x = torch.tensor(values, dtype=torch.float32)
    for low in (low_bits, 0x8000, 0x7FFF):  # 0x8000: an exact tie
        v = ((x.view(torch.int32) & -65536) | low).view(torch.float32)
        v = torch.where(v.isfinite(), v, x)
        assert torch.equal(bf16_rounded(v), v.to(torch.bfloat16).float())
    as_bf16 = x.to(torch.bfloat16)
    assert torch.equal(rounded_float(as_bf16), as_bf16.float())
    assert torch.equal(rounded_float(x), x)
    trained = as_bf16.clone().requires_grad_(True)  # bf16 autocast training: the gradient passes the norm's input
    rounded_float(trained).sum().backward()
    assert torch.equal(trained.grad, torch.ones_like(trained))
