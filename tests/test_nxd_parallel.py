"""Tensor parallelism on the nxd backend (backends/nxd_parallel.py), everything before the SDK call:
which projection becomes which NxD parallel layer at which size, the whole tensors NxD's checkpoint
sharding splits (each rank's block checked against slices of the Hugging Face tensors), the layers
swapped in computing, rank by rank and summed, what the whole layer computes, the weight dict and its
read-only tables, and the build refusing a degree or a missing SDK before any work.

NxD's own pieces are not here (no SDK on this machine): where a test needs a rank's share of a layer it
uses a stand-in that applies NxD's documented rule (equal contiguous blocks along the partition
dimension, block r to rank r; `create_local_weight` in neuronx_distributed/trace/trace.py) and computes
a rank's partial product, without the all-reduce. The real build and its tokens are the last test,
marked `neuron`.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compile.build import BuildRequest, build_artifacts
from neuron_peagle.runtime.manifest import Manifest, tensor_infos
from neuron_peagle.graphs.interface import plan, target_caches
from conftest import save_tiny_model
from neuron_peagle.backends.nxd import INSTALL_HINT
from neuron_peagle.backends.nxd_graphs import NxdBundle
from neuron_peagle.backends.nxd_parallel import (COLUMN, ROW, NxdTensorParallel, ProjectionPlan, parallel_state,
                                                 plan_projections, rank_checkpoints, shard_target, split_rank_tensors,
                                                 whole_projection)
from neuron_peagle.config import BuildConfig
from neuron_peagle.errors import ArtifactError, BackendUnavailableError, ConfigError
from neuron_peagle.models.target import TargetModel
from neuron_peagle.models.weights import read_safetensors_dir
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.engine import Engine, SamplingParams
from neuron_peagle.speculation import SpeculationConfig
from spec_helpers import DRAFTER_ALONE, make_engine, nxd_plan

# The nxd backend (NxD, trn1) lives in the torch-xla environment, and so do its tests.
pytestmark = pytest.mark.xla

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=64, seed=7, num_hidden_layers=2, hidden_size=96, num_attention_heads=6, head_dim=16,
             intermediate_size=96)
ENGINE = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=64, prefill_buckets=(16,),
              lookup_ngram=2)
HD, HEADS, WIDTH = 16, 6, 96


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The brief's target (6 query heads, one KV head: replicated on every rank) as Llama, and a Qwen2
    one with biases on q/k/v and 6 KV heads (split, not replicated, so a rank's cache is smaller)."""
    root = tmp_path_factory.mktemp("nxd_tp")
    return {"llama": save_tiny_model(root / "llama", "llama", num_key_value_heads=1, **SHAPE),
            "qwen2": save_tiny_model(root / "qwen2", "qwen2", num_key_value_heads=6, **SHAPE),
            # mixture of experts: 6 experts, sinks, biases, a sliding window on even layers
            "gpt_oss": save_tiny_model(root / "gpt_oss", "gpt_oss", num_key_value_heads=1, num_local_experts=6,
                                       **SHAPE)}


def nxd_blocks(plan: ProjectionPlan, whole: dict[str, torch.Tensor], degree: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's tensors by NxD's sharding rule: a column layer's rows, a row layer's columns, cut into
    `degree` equal blocks, block r to rank r; a row layer's bias (added after the sum) whole."""
    ranks = []
    for rank in range(degree):
        ranks.append({kind: tensor if plan.style == ROW and kind == "bias"
                      else tensor.chunk(degree, dim=0 if plan.style == COLUMN else 1)[rank]
                      for kind, tensor in whole.items()})
    return ranks


class RankColumn(nn.Module):
    """A rank's ColumnParallelLinear(gather_output=False): its rows of the whole matrix, [out/N, in]."""

    def __init__(self, block: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(block["weight"], requires_grad=False)
        self.bias = nn.Parameter(block["bias"], requires_grad=False) if "bias" in block else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RankRow(nn.Module):
    """A rank's RowParallelLinear(input_is_parallel=True) before its all-reduce: its columns, [out, in/N];
    the bias counted once (rank 0), as NxD adds it once after the sum."""

    def __init__(self, block: dict[str, torch.Tensor], rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(block["weight"], requires_grad=False)
        self.bias = nn.Parameter(block["bias"], requires_grad=False) if "bias" in block and rank == 0 else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def rank_layers(wholes: dict[str, dict[str, torch.Tensor]], degree: int, rank: int):
    """`make_layer` for shard_target: the stand-in of rank `rank`, holding its block of each whole tensor."""

    def make(plan: ProjectionPlan) -> nn.Module:
        block = nxd_blocks(plan, wholes[plan.name], degree)[rank]
        for kind, tensor in block.items():
            assert tuple(tensor.shape) == plan.local_shape(kind, degree), (plan.name, kind)
        return RankColumn(block) if plan.style == COLUMN else RankRow(block, rank)

    return make


def wholes_of(target: TargetModel, tp: TensorParallel) -> dict[str, dict[str, torch.Tensor]]:
    return {plan.name: whole_projection(plan, target.get_submodule(plan.name), target.config, tp)
            for plan in plan_projections(target, tp)}


# ---- the plan and the whole tensors -------------------------------------------------------------------

@pytest.mark.parametrize("degree", [2, 3])
def test_the_plan_gives_each_projection_its_nxd_layer_and_sizes(models, degree):
    target = TargetModel.from_pretrained(models["llama"], 32)
    plans = plan_projections(target, TensorParallel(degree))
    assert [(p.name, p.style) for p in plans[:4]] == [
        ("layers.0.self_attn.qkv_proj", COLUMN), ("layers.0.mlp.gate_up_proj", COLUMN),
        ("layers.0.self_attn.o_proj", ROW), ("layers.0.mlp.down_proj", ROW)]
    assert len(plans) == 8 and {p.layer for p in plans} == {0, 1}
    sizes = {p.kind: (p.input_size, p.output_size) for p in plans}
    # q/k/v: every rank's own q heads and one (replicated) KV head for k and for v.
    assert sizes["self_attn.qkv_proj"] == (96, degree * (HEADS // degree + 2) * HD)
    assert sizes == {**sizes, "mlp.gate_up_proj": (96, 2 * WIDTH), "self_attn.o_proj": (HEADS * HD, 96),
                     "mlp.down_proj": (WIDTH, 96)}
    assert all(not p.bias and p.dtype == torch.float32 for p in plans)
    assert [p.bias for p in plan_projections(TargetModel.from_pretrained(models["qwen2"], 32),
                                             TensorParallel(degree))[:4]] == [True, False, False, False]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("degree", [2, 3])
def test_each_rank_gets_the_hugging_face_slices_of_its_heads_and_width(models, family, degree):
    """What NxD's sharding hands rank r, from the whole tensors: exactly its q heads, its KV heads (the one
    KV head on every rank for Llama; its own for Qwen2), its slice of gate and up, and the o and down
    columns that read them, as slices of the checkpoint's own tensors."""
    hf = read_safetensors_dir(models[family])
    target = TargetModel.from_pretrained(models[family], 32)
    tp = TensorParallel(degree)
    wholes = wholes_of(target, tp)
    heads, width = HEADS // degree, WIDTH // degree
    for plan in plan_projections(target, tp):
        prefix = f"model.layers.{plan.layer}."
        for rank, block in enumerate(nxd_blocks(plan, wholes[plan.name], degree)):
            q = slice(rank * heads * HD, (rank + 1) * heads * HD)
            kv_heads = tp.for_rank(rank).kv_heads(target.config.num_key_value_heads)
            kv = slice(kv_heads.start * HD, kv_heads.stop * HD)
            mlp = slice(rank * width, (rank + 1) * width)
            for kind, got in block.items():
                if plan.kind == "self_attn.qkv_proj":
                    want = torch.cat([hf[f"{prefix}self_attn.q_proj.{kind}"][q], hf[f"{prefix}self_attn.k_proj.{kind}"][kv],
                                      hf[f"{prefix}self_attn.v_proj.{kind}"][kv]])
                elif plan.kind == "mlp.gate_up_proj":
                    want = torch.cat([hf[f"{prefix}mlp.gate_proj.{kind}"][mlp], hf[f"{prefix}mlp.up_proj.{kind}"][mlp]])
                elif plan.kind == "self_attn.o_proj":
                    want = hf[f"{prefix}self_attn.o_proj.{kind}"][:, q]
                else:
                    want = hf[f"{prefix}mlp.down_proj.{kind}"][:, mlp]
                assert torch.equal(got, want.float()), (plan.name, kind, rank)
    assert {kind for w in wholes.values() for kind in w} == ({"weight", "bias"} if family == "qwen2" else {"weight"})


def test_a_degree_that_does_not_divide_is_refused_before_anything_changes(models):
    target = TargetModel.from_pretrained(models["llama"], 32)
    before = {n: t.clone() for n, t in target.state_dict().items()}
    with pytest.raises(ConfigError, match=r"attention heads \(6\) is not divisible by tp_degree 4"):
        shard_target(target, [target.new_cache(1)], TensorParallel(4), rank_layers({}, 4, 0))
    assert all(torch.equal(before[n], t) for n, t in target.state_dict().items())
    assert type(target.layers[0].self_attn.qkv_proj).__name__ == "Linear"


# ---- the layers swapped in -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("degree", [2, 3])
def test_ranks_on_their_shards_compute_the_whole_layer(models, family, degree):
    """Swapped in by shard_target, each rank's layers (its heads, its KV heads in its own smaller cache,
    its width) give partial attention and MLP outputs whose sum over ranks is the whole layer's, which is
    what RowParallelLinear's all-reduce makes of them; each rank's cache holds its KV heads' entries."""
    torch.manual_seed(0)
    whole = TargetModel.from_pretrained(models[family], 32)
    tp = TensorParallel(degree)
    wholes = wholes_of(whole, tp)
    cache = whole.new_cache(2)
    x = torch.randn(2, 5, 96)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cos, sin = whole.rotary(positions)
    layer = whole.layers[1]
    want_attn = layer.self_attn(x, cos, sin, positions, cache, 1)
    want_mlp = layer.mlp(x)

    got_attn, got_mlp = torch.zeros_like(want_attn), torch.zeros_like(want_mlp)
    num_kv = whole.config.num_key_value_heads
    for rank in range(degree):
        target, rank_cache = copy.deepcopy(whole), whole.new_cache(2)
        swaps = shard_target(target, [rank_cache], tp, rank_layers(wholes, degree, rank))
        assert [s.plan.name for s in swaps] == [p.name for p in plan_projections(whole, tp)]
        attn = target.layers[1].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (HEADS // degree, len(tp.kv_heads(num_kv)))
        assert rank_cache.shape == (2, len(tp.kv_heads(num_kv)), 32, HD)
        assert all(b.shape == rank_cache.shape and not b.any() for b in rank_cache.buffers())
        got_attn += attn(x, cos, sin, positions, rank_cache, 1)
        got_mlp += target.layers[1].mlp(x)
        heads = tp.for_rank(rank).kv_heads(num_kv)
        for got, want in zip(rank_cache.layer(1), cache.layer(1)):
            torch.testing.assert_close(got, want[:, heads.start:heads.stop], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_attn, want_attn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mlp, want_mlp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("degree", [2, 3])
def test_moe_ranks_on_their_heads_sinks_and_experts_compute_the_whole_layer(models, degree):
    """gpt-oss on the nxd mapping: attention on the parallel layers (its sinks split by head), the experts by
    expert parallelism (rank r's E/N whole, their first index as data); each rank, given its own tensors,
    computes partial outputs whose sum over ranks is the whole layer's (what NxD's all-reduce makes)."""
    torch.manual_seed(0)
    whole = TargetModel.from_pretrained(models["gpt_oss"], 32)
    tp = TensorParallel(degree)
    wholes = wholes_of(whole, tp)
    assert {p.kind for p in plan_projections(whole, tp)} == {"self_attn.qkv_proj", "self_attn.o_proj"}
    cache = whole.new_cache(2)
    x = torch.randn(2, 5, 96)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cos, sin = whole.rotary(positions)
    layer = whole.layers[1]  # a full-attention layer
    want_attn, want_mlp = layer.self_attn(x, cos, sin, positions, cache, 1), layer.mlp(x)
    got_attn, got_mlp = torch.zeros_like(want_attn), torch.zeros_like(want_mlp)
    share = 6 // degree
    for rank in range(degree):
        target, rank_cache = copy.deepcopy(whole), whole.new_cache(2)
        shard_target(target, [rank_cache], tp, rank_layers(wholes, degree, rank))
        parts = split_rank_tensors(target, tp, nn.Identity)
        for part in parts:
            part.use(rank)
        experts = target.layers[1].mlp.experts
        assert experts.gate_up.shape[0] == share and int(experts.first_expert) == rank * share
        assert torch.equal(experts.down, layer.mlp.experts.down[rank * share:(rank + 1) * share])
        attn = target.layers[1].self_attn
        assert torch.equal(attn.sinks, layer.self_attn.sinks[rank * 6 // degree:(rank + 1) * 6 // degree])
        got_attn += attn(x, cos, sin, positions, rank_cache, 1)
        got_mlp += target.layers[1].mlp(x)
    torch.testing.assert_close(got_attn, want_attn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mlp, want_mlp, rtol=1e-4, atol=1e-5)


def test_each_ranks_weight_dict_holds_its_own_experts_and_sinks(models):
    degree = 3
    engine = make_engine(models["gpt_oss"], **ENGINE)
    whole = copy.deepcopy(engine.target)
    tp = TensorParallel(degree)
    wholes = wholes_of(engine.target, tp)
    caches = target_caches([s.module for s in plan(engine.runner)])
    swaps = shard_target(engine.target, caches, tp, rank_layers(wholes, degree, 0))
    parts = split_rank_tensors(engine.target, tp, nn.Identity)

    def same_dict_for_every_rank(checkpoint, model):  # NxD's rule for tensors outside its parallel layers
        kept = {name: t for name, t in checkpoint.items() if name in model.state_dict()}
        return [dict(kept) for _ in range(degree)]

    sharding = NxdTensorParallel(degree, swaps, engine.target.config, same_dict_for_every_rank, parts)
    specs = nxd_plan(engine)
    sharding.persist_tables(specs)
    bundle = NxdBundle.of(specs)
    ranks = sharding.rank_checkpoints(bundle, sharding.whole_checkpoint(bundle))
    for rank, weights in enumerate(ranks):
        for i, layer in enumerate(whole.layers):
            prefix = f"graph.target.layers.{i}."
            experts = slice(rank * 2, (rank + 1) * 2)
            for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
                assert torch.equal(weights[prefix + f"mlp.experts.{name}"], getattr(layer.mlp.experts, name)[experts])
            assert int(weights[prefix + "mlp.experts.first_expert"]) == rank * 2
            assert torch.equal(weights[prefix + "self_attn.sinks"], layer.self_attn.sinks[rank * 2:(rank + 1) * 2])
            assert torch.equal(weights[prefix + "mlp.router.weight"], layer.mlp.router.weight)  # whole everywhere


# ---- the weight dict of a sharded engine -------------------------------------------------------------

def sharded_engine(model_dir: Path, degree: int):
    engine = make_engine(model_dir, **ENGINE)
    tp = TensorParallel(degree)
    wholes = wholes_of(engine.target, tp)
    caches = target_caches([s.module for s in plan(engine.runner)])
    swaps = shard_target(engine.target, caches, tp, rank_layers(wholes, degree, 0))
    specs = nxd_plan(engine)
    return engine, NxdTensorParallel(degree, swaps, engine.target.config), specs, wholes


def test_the_sharded_engines_weight_dict_holds_whole_projections_and_its_tables(models):
    degree = 3
    engine, sharding, specs, wholes = sharded_engine(models["qwen2"], degree)
    sharding.persist_tables(specs)
    for spec in specs:
        kept = set(spec.module.state_dict(keep_vars=True))
        assert {"target.rotary.cos", "target.rotary.sin", "proposer.inner.fc_mask_row",
                "proposer.inner.drafter.d2t", "proposer.inner.drafter.rotary.cos"} <= kept
        assert kept.isdisjoint(spec.state_names)  # state starts zeroed on the device, never in the weights
        assert spec.state_buffers["cache.key_0"].shape == (2, 6 // degree, 64, HD)  # the target's: a rank's KV heads
        assert spec.state_buffers["proposer.inner.cache.key_0"].shape == (2, 6, 64, HD)  # the drafter's: whole
    bundle = NxdBundle.of(specs)
    layout, whole = sharding.layout(bundle), sharding.whole_checkpoint(bundle)
    assert set(layout) == set(whole) == set(bundle.checkpoint)
    assert tensor_infos(layout) == tensor_infos(whole) and all(t.is_meta for t in layout.values())
    for projection, tensors in wholes.items():  # every swapped projection, whole; nothing else changed
        for kind, want in tensors.items():
            assert torch.equal(whole[f"graph.target.{projection}.{kind}"], want)
    swapped = {f"graph.target.{projection}.{kind}" for projection, tensors in wholes.items() for kind in tensors}
    assert all(whole[n] is bundle.checkpoint[n] for n in set(whole) - swapped)
    qkv = "graph.target.layers.0.self_attn.qkv_proj.weight"
    assert whole[qkv].shape == (degree * (2 + 2 * 2) * HD, 96) and bundle.checkpoint[qkv].shape == (6 * HD, 96)
    drafter_qkv = "graph.proposer.inner.drafter.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(whole[drafter_qkv], bundle.checkpoint[drafter_qkv])  # the drafter stays whole


def test_shard_checkpoint_would_drop_a_table_that_is_not_persistent(models):
    """NxD's shard_checkpoint keeps only names in the model's state_dict(); `rank_checkpoints` refuses a
    dict that lost a name that way. The stand-in below applies just that rule and gives every rank the
    same dict: what NxD does to the parallel layers' tensors is not this test's business."""
    def state_dict_filter(checkpoint, model):
        kept = {name: t for name, t in checkpoint.items() if name in model.state_dict()}
        return [kept, dict(kept)]

    engine, sharding, specs, _ = sharded_engine(models["llama"], 2)
    bundle = NxdBundle.of(specs)
    with pytest.raises(ArtifactError, match=r"dropped \[.*rotary\.cos.*not persistent"):
        rank_checkpoints(state_dict_filter, bundle.graphs, sharding.whole_checkpoint(bundle), 2)
    sharding.persist_tables(specs)
    ranks = rank_checkpoints(state_dict_filter, bundle.graphs, sharding.whole_checkpoint(bundle), 2)
    state = {f"graph.{n}" for spec in specs for n in spec.state_names}
    assert set(ranks[0]) == set(bundle.checkpoint) - state
    with pytest.raises(BackendUnavailableError, match="Neuron SDK's own pip repository"):
        sharding.rank_checkpoints(bundle, {})  # NxD's own sharding needs the SDK


def test_the_surgery_on_the_xla_device_traces_a_ranks_graph(models):
    """As the build does it: the engine on the XLA device, layers swapped in place (on that device), the
    HLO then has a rank's shapes: its q/k/v rows and its smaller KV cache."""
    from neuron_peagle.backends.xla_artifacts import trace_hlo

    degree = 2
    engine = make_engine(models["qwen2"], **{**ENGINE, "backend": "xla"})
    tp = TensorParallel(degree)
    wholes = {name: {k: t.cpu() for k, t in tensors.items()} for name, tensors in wholes_of(engine.target, tp).items()}
    shard_target(engine.target, target_caches([s.module for s in plan(engine.runner)]), tp, rank_layers(wholes, degree, 0))
    assert engine.target.layers[0].self_attn.qkv_proj.weight.device.type == "xla"
    assert engine.runner.cache.key_0.device.type == "xla"
    spec = next(s for s in plan(engine.runner) if s.kind == "spec_step")
    hlo, _ = trace_hlo(spec, engine.backend)
    assert f"f32[{(HEADS // degree + 2 * 6 // degree) * HD},96]" in hlo  # a rank's q, k, v rows
    assert f"f32[2,{6 // degree},64,{HD}]" in hlo and f"f32[2,6,64,{HD}]" in hlo  # target cache: a rank's; drafter's: whole


# ---- the build ---------------------------------------------------------------------------------------

def test_a_sharded_build_refuses_a_degree_or_backend_before_any_work(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"attention heads \(6\) is not divisible by tp_degree 4"):
        BuildRequest(models["llama"], None, out, backend="nxd", tp_degree=4)
    with pytest.raises(ConfigError, match="built for the nxd backend only .*torchrun"):
        BuildRequest(models["llama"], None, out, backend="xla", tp_degree=2)
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="the Neuron SDK is installed")
def test_a_sharded_build_without_the_sdk_says_what_to_install_before_any_work(models, tmp_path):
    out = tmp_path / "out"
    request = BuildRequest(models["llama"], None, out, backend="nxd", tp_degree=3,
                           build=BuildConfig(batch_size=2, max_length=64, prefill_buckets=(16,)),
                           speculation=SpeculationConfig(num_speculative_tokens=3, **DRAFTER_ALONE))
    with pytest.raises(BackendUnavailableError) as err:
        build_artifacts(request)
    assert str(err.value) == INSTALL_HINT and "neuron-trn1" in INSTALL_HINT
    assert not out.exists()
    with pytest.raises(BackendUnavailableError):
        parallel_state(3)
    with parallel_state(1):  # one rank: no parallel state needed, none asked for
        pass


@pytest.mark.neuron
@pytest.mark.parametrize("degree", [2])
def test_sharded_nxd_artifacts_generate_the_eager_tokens(models, tmp_path, degree):
    """On a trn1 instance (the torch-xla environment with the Neuron SDK, at least `degree` NeuronCores):
    the nxd build with --tp-degree shards the target's layers with NxD's parallel layers, the NxDModel
    runs on `degree` ranks, and generation gives the eager engine's tokens."""
    pytest.importorskip("torch_neuronx")
    pytest.importorskip("neuronx_distributed")
    model_dir = models["llama"]
    cmd = [sys.executable, "-m", "compile.build", "--backend", "nxd", "--model", str(model_dir), "--out",
           str(tmp_path), "--mode", "parallel", "-k", "3", "--batch-size", "2", "--max-length", "64",
           "--prefill-buckets", "16", "--lookup-ngram", "2", "--tp-degree", str(degree), "--target", "trn1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = Manifest.load(tmp_path)
    assert manifest.tp_degree == degree
    layout = {t.name: t.shape for t in manifest.neuron_checkpoint}
    assert layout["graph.target.layers.0.self_attn.qkv_proj.weight"] == (degree * (HEADS // degree + 2) * HD, 96)
    engine = Engine.from_compiled(tmp_path)
    eager = make_engine(model_dir, **ENGINE)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]]
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    assert [o.output_ids for o in engine.generate(prompts, greedy)] == \
        [o.output_ids for o in eager.generate(prompts, greedy)]
