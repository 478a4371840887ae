"""Mixture-of-experts targets: Qwen3-MoE and gpt-oss (sinks, sliding window, YaRN, biases, clamped
SwiGLU experts), exact against transformers on tiny random configs, under plain and P-EAGLE decoding,
eager and compiled."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_tiny_model
from neuron_peagle.config import DrafterConfig, ModelConfig, MoeConfig
from neuron_peagle.models.moe import Experts, SparseMoe
from neuron_peagle.models.target import TargetModel, default_feature_layers
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import fill_table, table_engine, make_engine

FAMILIES = ["qwen3_moe", "gpt_oss"]
PROMPTS = [[5, 9, 13, 40], [7, 300, 11], [900, 901, 902, 903, 904, 905, 906, 907, 908, 909, 910], [31, 32]]
NEW_TOKENS = 30  # past the tiny gpt-oss's sliding window of 8: its rings wrap several times


def _tiny_moe_model(family: str, root):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(root / "model", family, tie=False, seed=5, num_hidden_layers=4)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, hf, _hf_greedy(hf)


def _hf_greedy(hf) -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS, one prompt at a time."""
    want = []
    with torch.no_grad():
        for ids in PROMPTS:
            ids_t = torch.tensor([ids])
            out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(ids):].tolist())
    return want


@pytest.fixture(scope="module", params=FAMILIES)
def moe_model(request, tmp_path_factory):
    """A tiny random target of each family and transformers' greedy continuations of PROMPTS."""
    return _tiny_moe_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gpt_oss_model(tmp_path_factory):
    """The tiny gpt-oss alone: every MoE feature at once (sinks, rings, both expert formulations)."""
    return _tiny_moe_model("gpt_oss", tmp_path_factory.mktemp("gpt_oss_compiled"))


def test_configs_read_as_transformers_builds_them(moe_model):
    model_dir, hf, _ = moe_model
    config = ModelConfig.from_dir(model_dir)
    assert config.moe.num_experts == 8 and config.moe.num_experts_per_tok == 2
    if config.architecture == "gpt_oss":
        assert config.layer_types == tuple(hf.config.layer_types) and config.sliding_window == 8
        assert config.attention_sinks and config.moe.routing == "topk_softmax" and config.rope.rope_type == "yarn"
        assert config.rope.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(8.0)).item() + 1)
    else:
        assert config.qk_norm and config.moe.norm_topk_prob and config.moe.routing == "softmax_topk"
        assert not any(config.sliding_layers)


def test_logits_match_transformers_through_prefill_verify_and_rejections(moe_model):
    """A padded prefill, then verify-sized calls whose last two tokens are wrong (as rejected drafts
    are) and are rewritten by the next call, then single-token decodes: every real position's logits
    equal transformers' full forward (within 1e-3, same argmax), with gpt-oss's rings wrapping."""
    model_dir, hf, _ = moe_model
    seq = 36
    ids = torch.randint(0, 49152, (2, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    model = TargetModel.from_pretrained(model_dir, max_length=64)
    cache = model.new_cache(2, step_tokens=4)
    got = torch.zeros_like(want)
    positions = torch.arange(seq).expand(2, seq)
    with torch.no_grad():
        prompt = torch.cat([ids[:, :13], torch.full((2, 3), 7)], dim=1)  # bucket 16, 3 padding tokens
        out = model(prompt, positions[:, :16], cache, torch.arange(13).expand(2, 13), valid_lengths=torch.tensor([13, 13]))
        got[:, :13] = out.logits
        start = 13
        while start + 4 <= 28:  # 2 right tokens, then 2 wrong ones; the next call starts after the right ones
            chunk = torch.cat([ids[:, start:start + 2], (ids[:, start + 2:start + 4] + 1) % 49152], dim=1)
            rows = torch.arange(4).expand(2, 4)
            out = model(chunk, positions[:, start:start + 4], cache, rows)
            got[:, start:start + 3] = out.logits[:, :3]  # the 3rd row saw only right tokens
            start += 2
        for t in range(start, seq):
            out = model(ids[:, t:t + 1], positions[:, t:t + 1], cache, torch.zeros(2, 1, dtype=torch.long))
            got[:, t] = out.logits[:, 0]
    assert (got - want).abs().max() <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_generation_equals_transformers(moe_model, batch_size):
    """Plain, P-EAGLE with a random drafter (few drafts accepted: many rejections) and with an oracle
    drafter (all accepted) decode exactly transformers' greedy tokens."""
    model_dir, _, want = moe_model
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    shapes = dict(batch_size=batch_size, max_length=64, prefill_buckets=(16,))
    for options in (dict(mode="plain"), dict(mode="parallel", num_speculative_tokens=3)):
        engine = make_engine(model_dir, **shapes, **options)
        assert [o.output_ids for o in engine.generate(PROMPTS, params)] == want, options
    oracle = table_engine(model_dir, 3, batch_size, max_length=64, buckets=(16,))
    outputs = []
    for start in range(0, len(PROMPTS), batch_size):
        fill_table(oracle, PROMPTS[start:start + batch_size], want[start:start + batch_size])
        outputs += oracle.generate(PROMPTS[start:start + batch_size], params)
    assert [o.output_ids for o in outputs] == want
    assert min(o.stats.acceptance_length for o in outputs) >= 3.5  # K=3: every draft accepted


def _poison_all_but(experts: Experts, keep: set[int]) -> None:
    with torch.no_grad():
        for e in range(experts.config.num_experts):
            if e not in keep:
                experts.gate_up[e].fill_(float("nan"))
                experts.down[e].fill_(float("nan"))


@pytest.mark.parametrize("shape", [(4, 1), (1, 4)], ids=["decode-b4", "verify-b1"])
def test_a_step_reads_only_the_selected_experts(moe_model, shape):
    """Every expert the router did not pick holds NaN: a decode or verify step that read (or multiplied
    by zero) any of them would return NaN. Those shapes take the per-token gather."""
    model_dir, _, _ = moe_model
    model = TargetModel.from_pretrained(model_dir, max_length=64)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoe))
    x = torch.randn(*shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    assert moe.uses_gather(shape[0] * shape[1])
    with torch.no_grad():
        clean = moe(x)
        _, ids = moe.router(x.reshape(-1, x.shape[-1]))
        selected = set(ids.flatten().tolist())
        assert len(selected) < moe.config.num_experts  # some experts are left out
        _poison_all_but(moe.experts, selected)
        torch.testing.assert_close(moe(x), clean, rtol=0, atol=0)
        _poison_all_but(moe.experts, selected - {ids[0, 0].item()})  # the control: a selected one poisoned
        assert moe(x).isnan().any()


def test_prefill_blocks_read_only_the_experts_that_have_tokens(moe_model):
    """The grouped formulation (prefill: 64 routed rows over 8 experts) with every token routed to 3 of
    the 8 experts: the other 5 hold NaN and the output is still the per-token one."""
    model_dir, _, _ = moe_model
    model = TargetModel.from_pretrained(model_dir, max_length=64)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoe))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(32, model.config.hidden_size, generator=generator)
    ids = torch.tensor([1, 4, 6])[torch.rand(32, 3, generator=generator).argsort(-1)[:, :2]]
    scores = torch.rand(32, 2, generator=generator)
    assert not moe.uses_gather(32)
    with torch.no_grad():
        want = (moe.experts.per_token(x, ids) * scores.unsqueeze(-1)).sum(1)
        _poison_all_but(moe.experts, {1, 4, 6})
        torch.testing.assert_close(moe.experts.grouped(x, ids, scores), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 40), experts=st.integers(1, 12), data=st.data())
def test_grouped_blocks_equal_the_per_token_gather(tokens, experts, data):
    """Any routing (skewed ones included: every token to the same experts) sums alike both ways."""
    k = data.draw(st.integers(1, experts))
    config = MoeConfig(num_experts=experts, num_experts_per_tok=k, expert_intermediate_size=6, routing="softmax_topk",
                       expert_bias=data.draw(st.booleans()))
    layer = Experts(8, config)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(tokens, 8, generator=generator)
    skewed = data.draw(st.booleans())
    ids = (torch.arange(k).expand(tokens, k) if skewed
           else torch.rand(tokens, experts, generator=generator).argsort(-1)[:, :k])
    scores = torch.rand(tokens, k, generator=generator)
    want = (layer.per_token(x, ids) * scores.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(layer.grouped(x, ids, scores), want, rtol=1e-5, atol=1e-4)


def test_inductor_compiles_each_moe_graph_once(gpt_oss_model):
    """P-EAGLE on the compiled path: prefill and step graphs, greedy and sampling, each compiled once
    with no graph break (fullgraph), equal to eager, and nothing recompiled by whole generations. On
    gpt-oss, whose graphs hold every MoE piece (Qwen3-MoE's router differs only in its softmax; both
    families compile on the xla path too, tests/test_xla.py)."""
    from neuron_peagle.backends.compiled_artifacts import compiled_graph_count

    model_dir, _, want = gpt_oss_model
    spec = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=64, prefill_buckets=(16,))
    compiled = make_engine(model_dir, backend="inductor", **spec)
    before = compiled_graph_count()
    assert len(compiled.warm()) == 4 and compiled.backend.compile_count() == 4
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, top_k=30, seed=4)
    assert [o.output_ids for o in compiled.generate(PROMPTS, greedy)] == want
    eager = make_engine(model_dir, **spec)
    assert ([o.output_ids for o in compiled.generate(PROMPTS, sampled)]
            == [o.output_ids for o in eager.generate(PROMPTS, sampled)])
    assert compiled.backend.compile_count() == 4 and compiled_graph_count() - before == 4


def test_cli_generates_on_a_tiny_gpt_oss_with_a_speculators_drafter(tmp_path, capsys):
    """`neuron-peagle generate --model TINY_GPT_OSS --drafter DRAFTER`: a P-EAGLE drafter written in the
    speculators layout with norm_before_fc (as the published gpt-oss drafters are); the tokens equal
    transformers' greedy ones."""
    from transformers import AutoModelForCausalLM

    from neuron_peagle.cli import main
    from neuron_peagle.models.drafter_io import save_drafter
    from neuron_peagle.runtime.drafter_choice import random_drafter
    from neuron_peagle.tokenizer import load_tokenizer

    model_dir = save_tiny_model(tmp_path / "gpt-oss", "gpt_oss", tie=False, seed=8)
    target = ModelConfig.from_dir(model_dir)
    config = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers), num_layers=2,
                                      norm_before_fc=True, intermediate_size=96)
    drafter_dir = save_drafter(random_drafter(config, 128, seed=2), tmp_path / "drafter", verifier_config=target)
    saved = json.loads((drafter_dir / "config.json").read_text())
    assert saved["norm_before_fc"] is True and saved["speculators_model_type"] == "peagle"
    assert saved["speculators_config"]["verifier"]["architectures"] == ["GptOssForCausalLM"]

    assert main(["generate", "Hello there", "--model", str(model_dir), "--drafter", str(drafter_dir), "--json",
                 "--backend", "eager", "--max-length", "64", "--prefill-buckets", "16", "--max-new-tokens", "20",
                 "--no-chat-template", "--ignore-eos", "-k", "3"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prompt = load_tokenizer(model_dir).encode("Hello there")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert record["output_ids"] == want and str(drafter_dir) in record["drafter"]


def _mxfp4_encode(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert matrix [E, in, out] in gpt-oss's MXFP4 (each output row's blocks of 32 inputs share a
    power-of-two scale; codes the nearest E2M1 values): blocks [E, out, in/32, 16], scales [E, out, in/32]."""
    from neuron_peagle.models.mxfp4 import FP4_VALUES

    groups = dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], -1, 32)  # [E, out, G, 32]
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - torch.tensor(FP4_VALUES)).abs().argmin(-1)  # [E, out, G, 32]
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exponent + 127).to(torch.uint8)


def _mxfp4_copy(model_dir, out, encode_as=torch.uint8):
    """The model directory with its expert matrices stored as gpt-oss publishes them (MXFP4)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for path in model_dir.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, out / path.name)
    tensors = load_file(model_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4_encode(tensors.pop(name))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks.to(encode_as), scales
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out, tensors


def test_mxfp4_experts_load_as_transformers_dequantizes_them(gpt_oss_model, tmp_path):
    """gpt-oss as published stores its experts in MXFP4: they are dequantized at load, bit for bit as
    transformers does it, and plain and P-EAGLE decoding give transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from neuron_peagle.models.mxfp4 import dequantize

    model_dir, _, dense_want = gpt_oss_model
    quantized, tensors = _mxfp4_copy(model_dir, tmp_path / "mxfp4")
    assert ModelConfig.from_dir(quantized).expert_quantization == "mxfp4"
    for name in [n[:-len("_blocks")] for n in tensors if n.endswith("_blocks")]:
        blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"]
        assert torch.equal(dequantize(blocks, scales, name),
                           convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)), name
    want = _hf_greedy(AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32,
                                                           quantization_config=Mxfp4Config(dequantize=True)).eval())
    assert want != dense_want  # the 4-bit experts decode otherwise: the test sees the dequantized weights
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for options in (dict(mode="plain"), dict(mode="parallel", num_speculative_tokens=3)):
        engine = make_engine(quantized, batch_size=4, max_length=64, prefill_buckets=(16,), **options)
        assert [o.output_ids for o in engine.generate(PROMPTS, params)] == want, options


def test_mxfp4_blocks_of_another_dtype_are_refused_naming_them(gpt_oss_model, tmp_path):
    from neuron_peagle.errors import WeightsError

    quantized, _ = _mxfp4_copy(gpt_oss_model[0], tmp_path / "mxfp4", encode_as=torch.int16)
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.experts.down_proj_blocks is torch.int16, MXFP4"):
        TargetModel.from_pretrained(quantized, 64)


def test_quantized_checkpoints_are_refused(moe_model, tmp_path):
    from conftest import edited_model_dir
    from neuron_peagle.errors import UnsupportedModelError

    model_dir, _, _ = moe_model
    quantized = edited_model_dir(model_dir, tmp_path / "fp8",
                                 lambda c: {**c, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(UnsupportedModelError, match=r"quantized checkpoints \(fp8\) are not supported"):
        ModelConfig.from_dir(quantized)
    if ModelConfig.from_dir(model_dir).architecture != "gpt_oss":  # mxfp4 is gpt-oss's alone
        mxfp4 = edited_model_dir(model_dir, tmp_path / "mxfp4",
                                 lambda c: {**c, "quantization_config": {"quant_method": "mxfp4"}})
        with pytest.raises(UnsupportedModelError, match=r"quantized checkpoints \(mxfp4\)"):
            ModelConfig.from_dir(mxfp4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_round_as_each_family_does(gpt_oss_model, dtype):
    """gpt-oss's RMSNorm scales in float32 and then casts, Llama's casts and then scales: in half
    precision each of ours equals its family's bit for bit (they differ from each other), and a gpt-oss
    target's every norm takes its family's order."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from neuron_peagle.models.layers import RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, 64, generator=generator) * 3).to(dtype)
    weight = (1 + torch.randn(64, generator=generator)).to(dtype)
    results = {}
    for name, theirs, in_float32 in (("gpt_oss", GptOssRMSNorm(64, 1e-5), True), ("llama", LlamaRMSNorm(64, 1e-5), False)):
        ours = RMSNorm(64, 1e-5, scale_in_float32=in_float32)
        with torch.no_grad():
            ours.weight.data, theirs.weight.data = weight.clone(), weight.clone()
            results[name] = ours(x)
            assert torch.equal(results[name], theirs(x)), name
    assert not torch.equal(results["gpt_oss"], results["llama"])
    model = TargetModel.from_pretrained(gpt_oss_model[0], 64)
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1 and all(n.scale_in_float32 for n in norms)
