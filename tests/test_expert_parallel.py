"""Expert parallelism of mixture-of-experts targets (neuron_peagle/parallel.py): tiny random Qwen3-MoE and
gpt-oss targets under torchrun with 2 and 3 ranks (gloo, inductor, plain and P-EAGLE) decode exactly the
tokens one process decodes, and each rank holds only its experts (each run compiles every graph on every
rank: about a minute each); tests/test_lazy_loading.py checks a gpt-oss rank's slices of every kind of
tensor for 2 and 3 ranks in one process."""

from __future__ import annotations

import json

import pytest

from conftest import save_tiny_model
from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.drafter_io import save_drafter
from neuron_peagle.models.target import default_feature_layers
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.drafter_choice import random_drafter
from spec_helpers import make_engine
from test_tensor_parallel import WORKER, _torchrun
from tp_cases import MOE_CASES, generate_case

# 6 query heads and 6 experts split over 2 and 3 ranks; the one KV head is replicated on every rank.
SHAPE = dict(vocab_size=64, num_hidden_layers=2, hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
             head_dim=16)
EXPERTS = {"qwen3_moe": dict(num_experts=6), "gpt_oss": dict(num_local_experts=6)}


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def moe_target(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = save_tiny_model(root / "model", family, seed=5, **SHAPE, **EXPERTS[family])
    target = ModelConfig.from_dir(model_dir)
    drafter = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers), draft_vocab_size=64,
                                       intermediate_size=128)
    drafter_dir = save_drafter(random_drafter(drafter, 128, seed=3), root / "drafter")
    want = {name: generate_case(model_dir, drafter_dir, case, "eager") for name, case in MOE_CASES.items()}
    return family, model_dir, drafter_dir, want


def test_expert_parallel_ranks_decode_what_one_process_does_and_hold_only_their_experts(moe_target):
    family, model_dir, drafter_dir, want = moe_target
    # 2 and 3 ranks (3 or 2 whole experts each), one family each: each torchrun compiles every rank's graphs.
    ranks = {"gpt_oss": 3, "qwen3_moe": 2}[family]
    report = json.loads(_torchrun(ranks, str(WORKER), "moe", str(model_dir), str(drafter_dir), "inductor"))
    assert report["tokens"] == want
    assert report["tokens"]["P-EAGLE, greedy"] == want["plain greedy"]  # lossless, sharded too
    held = [rank["experts"] for rank in report["ranks"]]
    share = 6 // ranks
    assert held == [[[r * share, (r + 1) * share]] * SHAPE["num_hidden_layers"] for r in range(ranks)]
    for rank in report["ranks"]:
        assert rank["expert_params"] * ranks == rank["whole_expert_params"]
    whole = report["ranks"][0]["whole_expert_params"]
    # Everything but the experts is whole on every rank or split by heads: a rank holds less than it all.
    assert all(rank["params"] < whole for rank in report["ranks"])


def test_greedy_moe_cases_are_nontrivial(moe_target):
    _, _, _, want = moe_target
    assert len({tuple(ids) for ids in want["plain greedy"]}) > 1


def test_experts_that_do_not_divide_or_are_fewer_than_ranks_are_refused_before_any_work(moe_target, monkeypatch):
    from dataclasses import replace

    from neuron_peagle.models.target import TargetModel

    _, model_dir, _, _ = moe_target
    config = replace(ModelConfig.from_dir(model_dir), num_attention_heads=24)  # heads split over 4 and 12 ranks
    with pytest.raises(ConfigError, match=r"the target's experts \(6\) is not divisible by tp_degree 4"):
        TensorParallel(4).check(config)
    with pytest.raises(ConfigError, match=r"expert parallelism over 12 ranks needs at least one expert per rank; "
                                          r"the target has 6 experts"):
        TensorParallel(12).check(config)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(TargetModel, "from_pretrained", refuse)
    with pytest.raises(ConfigError, match=r"heads \(6\) is not divisible by tp_degree 4"):
        make_engine(model_dir, mode="plain", tp_degree=4)
