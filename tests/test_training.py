"""Drafter training: COD elements and attention pattern, the loss falls, and a trained checkpoint
serves through the engine with output identical to plain decoding."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron_peagle.errors import ConfigError
from neuron_peagle.runtime.engine import SamplingParams
from neuron_peagle.training.data import compute_features, generate_responses, load_shards
from neuron_peagle.training.objective import LossSettings, cod_elements, eagle3_loss, peagle_loss
from neuron_peagle.training.prompt_sets import Prompt
from neuron_peagle.training.trainer import CHECKPOINT_FORMAT, TrainConfig, train
from spec_helpers import make_engine


def test_cod_elements_form_chains_and_see_only_their_context():
    elements = cod_elements(40, depths=5, valid_last=40, generator=torch.Generator().manual_seed(0))
    kept = {(int(a), int(d)) for a, d in zip(elements.anchors, elements.depths)}
    assert sum(1 for _, d in kept if d == 0) == 40
    for a, d in kept:
        assert d == 0 or (a, d - 1) in kept  # every deeper element has its whole chain
        assert a + 1 + d <= 40
    counts = [sum(1 for _, d in kept if d == depth) for depth in range(5)]
    assert counts == sorted(counts, reverse=True) and counts[4] < counts[0]
    index = {key: i for i, key in enumerate(zip(elements.anchors.tolist(), elements.depths.tolist()))}
    a, d = next((a, d) for a, d in kept if d == 2)
    row = elements.visible[index[(a, d)]]
    seen = {key for key, i in index.items() if row[i]}
    assert seen == {(x, 0) for x in range(a + 1)} | {(a, 1), (a, 2)}
    assert torch.equal(elements.positions, elements.anchors + elements.depths)


def test_cod_mask_depths_go_only_where_something_is_learned():
    free = cod_elements(60, depths=4, valid_last=60, generator=torch.Generator().manual_seed(0))
    focused = cod_elements(60, depths=4, valid_last=60, generator=torch.Generator().manual_seed(0), first_learned=25)
    assert torch.equal(focused.anchors[focused.depths == 0], torch.arange(60))  # the prompt stays as context
    deep = focused.depths > 0
    assert bool((focused.anchors[deep] + 1 + focused.depths[deep] >= 25).all())
    assert bool((free.anchors[free.depths > 0] + 1 + free.depths[free.depths > 0] < 25).any())
    # As many mask elements as before where there are enough candidates (depth 1: 42 wanted, 36 there).
    assert int((focused.depths == 1).sum()) == 36 and int((free.depths == 1).sum()) == 42
    assert int((focused.depths == 3).sum()) == int((free.depths == 3).sum())


@pytest.mark.parametrize("objective", [peagle_loss, eagle3_loss])
def test_prompt_weight_decides_whether_prompt_predictions_are_learned(tiny_llama_dir, objective):
    from neuron_peagle.config import DrafterConfig
    from neuron_peagle.models.target import TargetModel
    from neuron_peagle.runtime.drafter_choice import random_drafter

    target = TargetModel.from_pretrained(tiny_llama_dir, 64)
    config = DrafterConfig.for_target(target.config, target.feature_layers, draft_vocab_size=target.config.vocab_size)
    drafter = random_drafter(config, 64, seed=2)
    ids = torch.randint(0, 200, (30,))
    features = torch.randn(30, 3 * target.config.hidden_size)
    teacher = torch.randn(30, target.config.vocab_size)
    other = teacher.clone()
    other[:8] = torch.randn(8, target.config.vocab_size)  # the target's predictions of prompt tokens 1..8
    response_start = 10

    def run(logits, weight):
        return objective(drafter, target.embed_tokens, ids, features, logits, response_start, 3,
                         torch.Generator().manual_seed(0), LossSettings(prompt_weight=weight))

    (loss, stats), (loss_other, _) = run(teacher, 0.0), run(other, 0.0)
    assert torch.equal(loss, loss_other)
    (weighted, weighted_stats), (weighted_other, _) = run(teacher, 0.5), run(other, 0.5)
    assert not torch.allclose(weighted, weighted_other)
    # The logged accuracy counts response tokens only, whatever the weight.
    assert torch.equal(stats["depth0"][2], weighted_stats["depth0"][2]) and int(stats["depth0"][2]) == 21
    with pytest.raises(ValueError, match="prompt_weight"):
        TrainConfig(prompt_weight=2.0)


def test_the_loss_weighs_elements_and_depths_as_its_settings_say():
    from neuron_peagle.training.objective import _depth_losses

    torch.manual_seed(0)
    # Six response elements: four at depth 0, two at depth 1 (response from position 0).
    anchors, depths_of = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 0, 0, 0, 1, 1])
    logits, teacher = torch.randn(6, 11), torch.randn(8, 11)
    target = torch.softmax(teacher[anchors + 1 + depths_of], -1)
    kl = (target * (target.log() - torch.log_softmax(logits, -1))).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits, target.argmax(-1), reduction="none")

    def loss(**settings):
        return _depth_losses(logits, anchors, depths_of, teacher, 1, 2, LossSettings(**settings), 1.0)[0]

    per_depth = (kl[:4].mean(), kl[4:].mean())
    assert torch.allclose(loss(), (per_depth[0] + per_depth[1]) / 2)
    assert torch.allclose(loss(decay=0.5), (per_depth[0] + 0.5 * per_depth[1]) / 1.5)
    assert torch.allclose(loss(weighting="element"), kl.mean())  # depth 0 weighs its four elements
    assert torch.allclose(loss(weighting="element", decay=0.5), (kl[:4].sum() + 0.5 * kl[4:].sum()) / 5)
    assert torch.allclose(loss(weighting="element", ce_weight=1.0), ce.mean())
    assert torch.allclose(loss(weighting="element", ce_weight=0.25), (0.75 * kl + 0.25 * ce).mean())
    for bad in ({"weighting": "token"}, {"ce_weight": 1.5}, {"decay": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossSettings(**bad)
    with pytest.raises(ValueError, match="weighting"):
        TrainConfig(depth_weighting="token")


def test_feature_noise_is_scaled_to_each_feature_layer():
    from neuron_peagle.training.trainer import feature_scales, noisy

    scales = torch.tensor([0.5, 2.0, 8.0])
    examples = [{"features": torch.randn(50, 3 * 16) * scales.repeat_interleave(16)} for _ in range(4)]
    medians = feature_scales(examples, 3)
    assert torch.allclose(medians / scales, torch.full((3,), 0.6745), atol=0.08)  # the median |N(0, s)| is 0.6745 s
    features = examples[0]["features"]
    noise = (noisy(features, medians * 0.1, torch.Generator().manual_seed(1)) - features).reshape(50, 3, 16)
    for layer in range(3):
        bound = float(medians[layer]) * 0.1
        assert 0.5 * bound < float(noise[:, layer].abs().max()) <= bound * (1 + 1e-6)


def test_eagle3_objective_feeds_the_drafters_own_hidden_back(tiny_llama_dir):
    from neuron_peagle.config import DrafterConfig
    from neuron_peagle.models.target import TargetModel
    from neuron_peagle.runtime.drafter_choice import random_drafter

    target = TargetModel.from_pretrained(tiny_llama_dir, 64)
    config = DrafterConfig.for_target(target.config, target.feature_layers, draft_vocab_size=target.config.vocab_size)
    drafter = random_drafter(config, 64, seed=1)
    for param in drafter.parameters():
        param.requires_grad_(True)
    ids = torch.randint(0, 200, (30,))
    features = torch.randn(30, 3 * target.config.hidden_size)
    teacher = torch.randn(30, target.config.vocab_size)
    args = (drafter, target.embed_tokens, ids, features, teacher, 5, 4)
    loss_p, stats_p = peagle_loss(*args, torch.Generator().manual_seed(0))
    loss_e, stats_e = eagle3_loss(*args, torch.Generator().manual_seed(0))
    # Depth 0 is the same real pair in both objectives; deeper depths see different inputs.
    assert torch.allclose(stats_p["depth0"], stats_e["depth0"], atol=1e-5)
    assert not torch.allclose(stats_p["depth2"], stats_e["depth2"])
    # The chain is differentiable end to end: depth 3 alone pushes gradient into fc through depths 0..2.
    drafter.zero_grad()
    eagle3_loss(*args, torch.Generator().manual_seed(0))[0].backward()
    assert drafter.fc.weight.grad.abs().sum() > 0 and drafter.mask_hidden.grad is None


def test_a_grown_drafter_computes_what_it_did_and_its_new_layer_learns(tiny_llama_dir):
    from neuron_peagle.config import DrafterConfig
    from neuron_peagle.models.target import TargetModel
    from neuron_peagle.runtime.drafter_choice import random_drafter
    from neuron_peagle.training.trainer import grow_drafter

    target = TargetModel.from_pretrained(tiny_llama_dir, 64)
    config = DrafterConfig.for_target(target.config, target.feature_layers, draft_vocab_size=target.config.vocab_size)
    small = random_drafter(config, 64, seed=3)
    grown = grow_drafter(small, 3)
    assert grown.config.num_layers == 3 and len(grown.layers) == 3
    embeds, hidden = torch.randn(1, 12, config.hidden_size), torch.randn(1, 12, config.hidden_size)
    positions, rows = torch.arange(12).unsqueeze(0), torch.arange(12).unsqueeze(0)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().unsqueeze(0)  # [1, S, S]
    before, _ = small(embeds, hidden, positions, None, rows, causal)
    after, _ = grown(embeds, hidden, positions, None, rows, causal)
    assert torch.allclose(before, after, atol=1e-6)
    # The zeroed output projections still get gradient, so the new layers can learn.
    for param in grown.parameters():
        param.requires_grad_(True)
    grown(embeds, hidden, positions, None, rows, causal)[0].square().sum().backward()
    assert grown.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="shrink"):
        grow_drafter(grown, 1)


# EAGLE-3's chain loss slows depth 0 down at this tiny budget (0.27 vs 0.45 top-1 after 48 steps).
@pytest.mark.parametrize("objective,mode,min_acceptance,precision", [("peagle", "parallel", 1.3, "bfloat16"),
                                                                      ("peagle", "parallel", 1.3, "float32"),
                                                                      ("eagle3", "sequential", 1.1, "bfloat16")])
def test_training_lowers_the_loss_and_the_drafter_serves(tmp_path, tiny_llama_dir, objective, mode,
                                                         min_acceptance, precision):
    engine = make_engine(tiny_llama_dir, mode="plain", batch_size=4, max_length=128,
                                    prefill_buckets=(64,))
    prompts = [Prompt("chat", "test", f"Tell me about the number {i}.") for i in range(8)]
    examples = generate_responses(engine, prompts, tmp_path / "responses.jsonl", max_new_tokens=24)
    assert len(examples) == 8 and all(e.response_ids for e in examples)
    # Resuming does not redo finished prompts.
    assert len(generate_responses(engine, prompts, tmp_path / "responses.jsonl", max_new_tokens=24)) == 8
    compute_features(engine.target, examples, tmp_path / "features", shard_size=4)
    shards = load_shards(sorted((tmp_path / "features").glob("*.safetensors")))
    assert len(shards) == 8 and shards[0]["features"].shape[-1] == 3 * engine.target.config.hidden_size

    config = TrainConfig(objective=objective, num_layers=1, draft_vocab_size=300, depths=3, epochs=12, lr=3e-3,
                         accumulate=2, checkpoint_every=1000, precision=precision)
    out = train(tiny_llama_dir, tmp_path, config, tmp_path / "drafter")
    if precision == "float32":  # once: the regularisers and the other loss weighting train too, a frozen
        _train_regularised(tmp_path, tiny_llama_dir, config, out)  # head stays where it started
    log = [json.loads(line) for line in (tmp_path / f"train_log_{objective}.jsonl").read_text().splitlines()]
    assert log[-1]["loss0"] < log[0]["loss0"] * 0.7
    assert (out / "config.json").is_file() and (out / "accuracy.png").is_file()

    spec = make_engine(tiny_llama_dir, out, mode=mode, num_speculative_tokens=3, batch_size=4,
                                  max_length=128, prefill_buckets=(64,))
    ids = [e.prompt_ids for e in examples[:4]]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    got = spec.generate(ids, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in engine.generate(ids, params)]
    # Trained on exactly these continuations, the drafter gets accepted.
    assert sum(o.stats.acceptance_length for o in got) / len(got) > min_acceptance


def _train_regularised(tmp_path, model_dir, config, trained):
    from safetensors.torch import load_file

    regularised = dataclasses.replace(config, epochs=1, run_name="regularised", depth_weighting="element",
                                      ce_weight=0.5, feature_noise=0.1, freeze_head=True, weight_decay=0.1,
                                      init_from=str(trained))
    again = train(model_dir, tmp_path, regularised, tmp_path / "again")
    before, after = (load_file(d / "model.safetensors") for d in (trained, again))
    head = next(name for name in before if "lm_head" in name)
    fc = next(name for name in before if "fc." in name)
    assert torch.equal(before[head], after[head]) and not torch.equal(before[fc], after[fc])


def test_a_wall_clock_budget_ends_training_with_the_learning_rate_decayed(tmp_path, tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, mode="plain", batch_size=4, max_length=128,
                                    prefill_buckets=(64,))
    prompts = [Prompt("code", "test", f"Write code number {i}.") for i in range(4)]
    compute_features(engine.target, generate_responses(engine, prompts, tmp_path / "r.jsonl", 16),
                     tmp_path / "features")
    config = TrainConfig(draft_vocab_size=200, depths=3, epochs=10_000, lr=1e-3, accumulate=1, seconds=4.0,
                         checkpoint_every=10_000)
    train(tiny_llama_dir, tmp_path, config, tmp_path / "drafter")
    log = [json.loads(line) for line in (tmp_path / "train_log_peagle.jsonl").read_text().splitlines()]
    assert log[-1]["seconds"] < 8.0  # the budget, plus at most the steps in flight when it ran out
    assert log[-1]["lr"] < 0.2 * config.lr  # the schedule was fitted to the budget, not to 10k epochs
    # A checkpoint of another format is refused, not resumed.
    checkpoint = tmp_path / "checkpoint_peagle.pt"
    state = torch.load(checkpoint, weights_only=False)
    torch.save({**state, "format": 1}, checkpoint)
    with pytest.raises(ConfigError, match=f"checkpoint format 1, this version reads format {CHECKPOINT_FORMAT}; "
                                          "delete it"):
        train(tiny_llama_dir, tmp_path, config, None)
    torch.save(state, checkpoint)

    # The checkpoint resumes only its own run: a warm start from the drafter with the same run name is
    # refused with the settings that differ, and goes ahead under another run name.
    warm = dataclasses.replace(config, init_from=str(tmp_path / "drafter"), seconds=1.0)
    with pytest.raises(ConfigError, match="init_from differ"):
        train(tiny_llama_dir, tmp_path, warm, None)
    train(tiny_llama_dir, tmp_path, dataclasses.replace(warm, run_name="warm"), None)
    assert (tmp_path / "drafter_warm" / "model.safetensors").is_file() and (tmp_path / "checkpoint_warm.pt").is_file()
    # A warm start under the other objective records that objective, not the one it started from.
    train(tiny_llama_dir, tmp_path, dataclasses.replace(warm, run_name="warm_eagle3", objective="eagle3"), None)
    for run, objective in (("warm", "peagle"), ("warm_eagle3", "eagle3")):
        saved = json.loads((tmp_path / f"drafter_{run}" / "config.json").read_text())
        assert saved["neuron_peagle"]["trained_with"] == objective


def test_more_prompts_add_only_new_responses_and_complete_the_last_shard(tmp_path, tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, mode="plain", batch_size=4, max_length=128,
                                    prefill_buckets=(64,))
    first = [Prompt("chat", "test", f"Say {i}.") for i in range(4)]
    examples = generate_responses(engine, first, tmp_path / "r.jsonl", 8)
    compute_features(engine.target, examples, tmp_path / "features", shard_size=3)  # shards of 3 and 1
    # A longer list (the old prompts, a repeat, two new ones) answers only the new prompts, in order.
    more = [*first, Prompt("chat", "test", "Say 0."), Prompt("code", "test", "Say 4."),
            Prompt("code", "test", "Say 5.")]
    examples = generate_responses(engine, more, tmp_path / "r.jsonl", 8)
    assert [e.prompt_ids for e in examples] == [engine.encode(p.text) for p in first + more[-2:]]
    compute_features(engine.target, examples, tmp_path / "features", shard_size=3)
    shards = sorted((tmp_path / "features").glob("*.safetensors"))
    loaded = load_shards(shards)
    assert len(shards) == 2 and [e["ids"].tolist() for e in loaded] == [e.ids for e in examples]


def test_sampled_answers_are_reproducible_written_beside_the_greedy_ones_and_resume(tmp_path, tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, mode="plain", batch_size=4, max_length=128,
                                    prefill_buckets=(64,))
    prompts = [Prompt("chat", "test", f"Say {i}.") for i in range(3)]
    path = tmp_path / "r.jsonl"
    greedy = generate_responses(engine, prompts, path, 16)
    first = generate_responses(engine, prompts, path, 16, sample=1, temperature=1.0, top_p=1.0)[3:]
    second = generate_responses(engine, prompts, path, 16, sample=2, temperature=1.0, top_p=1.0)[6:]
    assert [e.sample for e in first] == [1] * 3 and [e.sample for e in second] == [2] * 3
    assert [e.prompt_ids for e in first] == [e.prompt_ids for e in greedy]
    # Random weights at temperature 1: other seeds give other answers, the greedy one is not repeated.
    assert [e.response_ids for e in first] != [e.response_ids for e in second]
    assert [e.response_ids for e in first] != [e.response_ids for e in greedy]
    assert len(generate_responses(engine, prompts, path, 16, sample=1)) == 9  # resumed: nothing new
    # Seed n gives a prompt the same answer whatever batch it is answered in.
    again = generate_responses(engine, prompts[::-1], tmp_path / "again.jsonl", 16, sample=1, temperature=1.0,
                               top_p=1.0)
    assert sorted(e.response_ids for e in again) == sorted(e.response_ids for e in first)
    with pytest.raises(ValueError, match="sample"):
        generate_responses(engine, prompts, path, 16, sample=-1)


def test_the_stdlib_corpus_is_chunked_by_lines_without_tests_in_a_fixed_order(tmp_path):
    from neuron_peagle.training.corpus import stdlib_documents

    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("\n".join(f"value_{i} = {i}  # a line long enough" for i in range(90)))
    (tmp_path / "test" / "test_mod.py").write_text("\n".join(f"assert {i}  # a test line" for i in range(90)))
    docs = stdlib_documents(lines_per_chunk=40, seed=1, library=tmp_path)
    assert sorted(d.request for d in docs) == [f"Show lines {a}-{a + 39} of the Python module pkg.mod."
                                               for a in (1, 41, 81)]
    assert all("assert" not in d.text for d in docs)
    assert "value_40 = 40" in next(d.text for d in docs if "41-80" in d.request)
    assert docs == stdlib_documents(lines_per_chunk=40, seed=1, library=tmp_path)


def test_corpus_examples_keep_to_the_token_budget_and_the_sequence_length():
    from neuron_peagle.training.corpus import corpus_examples

    def encode(text: str) -> list[int]:
        return [ord(c) % 200 for c in text]

    examples = corpus_examples(["stdlib"], encode, encode, [7], max_tokens=20_000, max_sequence=1500)
    lengths = [len(e.response_ids) for e in examples]
    assert 20_000 <= sum(lengths) < 20_000 + 1500 and all(len(e.ids) <= 1500 for e in examples)
    assert any(len(e.ids) == 1500 for e in examples)  # long chunks are cut
    uncut = next(e for e in examples if len(e.ids) < 1500)
    assert uncut.response_ids[-1] == 7  # the end-of-turn token closes an uncut text
    with pytest.raises(ValueError, match="unknown corpus kinds"):
        corpus_examples(["novels"], encode, encode, [], 10, 10)


def test_training_reads_every_named_feature_set_and_names_a_missing_one(tmp_path, tiny_llama_dir):
    from neuron_peagle.training.data import Example

    engine = make_engine(tiny_llama_dir, mode="plain", batch_size=2, max_length=128,
                                    prefill_buckets=(64,))
    responses = generate_responses(engine, [Prompt("code", "test", f"Count to {i}.") for i in range(2)],
                                   tmp_path / "r.jsonl", 12)
    compute_features(engine.target, responses, tmp_path / "features")
    read = [Example("code", [1, 2, 3], [(5 * i + j) % 90 + 4 for j in range(20)]) for i in range(3)]
    compute_features(engine.target, read, tmp_path / "features_corpus")
    config = TrainConfig(draft_vocab_size=100, depths=2, epochs=1, accumulate=1, checkpoint_every=10_000,
                         feature_sets=("features", "features_corpus"))
    out = train(tiny_llama_dir, tmp_path, config, None)
    assert json.loads((out / "training.json").read_text())["examples"] == 5
    with pytest.raises(FileNotFoundError, match="features_more"):
        train(tiny_llama_dir, tmp_path, dataclasses.replace(config, feature_sets=("features", "features_more"),
                                                            run_name="other"), None)


def test_heldout_accuracy_is_what_each_parallel_draft_would_score(tmp_path, tiny_llama_dir):
    """The teacher-forced score, from one forward over all chains, equals drafting each anchor on its
    own (its real slots, then mask slots, plain causal attention), as the step graph drafts."""
    import json

    from neuron_peagle.config import DrafterConfig
    from neuron_peagle.models.target import TargetModel
    from neuron_peagle.runtime.drafter_choice import random_drafter
    from neuron_peagle.training.data import Example
    from neuron_peagle.training.evaluate import heldout_accuracy

    target = TargetModel.from_pretrained(tiny_llama_dir, 128)
    config = DrafterConfig.for_target(target.config, target.feature_layers, num_layers=1, draft_vocab_size=4)
    drafter = random_drafter(config, 160, seed=3)
    drafter.d2t.copy_(torch.arange(4) * 5)  # draft id i is target id 6 i
    # the target's greedy token is one of the four, so random drafts hit ~1 in 4 (the head untied
    # first: the tiny model's head is its embedding)
    target.lm_head.weight = torch.nn.Parameter(target.lm_head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        kept = target.lm_head.weight[:24:6].abs() + 1.0
        target.lm_head.weight.zero_()
        target.lm_head.weight[:24:6] = kept
    examples = [Example("code", [1, 2, 3, 4], [6 * ((7 * i + j) % 4) for j in range(14)]) for i in range(3)]
    compute_features(target, examples, tmp_path)
    (tmp_path / "domains.json").write_text(json.dumps(["code"] * 3))
    depths = 3
    [result] = heldout_accuracy(drafter, target, tmp_path, depths)

    correct, count = [0] * depths, [0] * depths
    covered = 0  # depth-0 positions whose greedy token is a draft token (a multiple of 6 below 24)
    band_hits: dict[int, list[int]] = {0: [], 1: [], 2: []}  # depth-0 hits by the target's top-1 probability
    with torch.no_grad():
        for example in load_shards(sorted(tmp_path.glob("shard_*.safetensors"))):
            ids = example["ids"].long()
            probs = torch.softmax(target.lm_head(target.norm(example["hidden"].float())), -1)
            greedy = probs.argmax(-1)
            for anchor in range(len(ids) - 1):
                slots = [(anchor_, False) for anchor_ in range(anchor + 1)]
                slots += [(anchor, True) for d in range(1, depths) if anchor + 1 + d <= len(ids) - 1]
                is_mask = torch.tensor([[m for _, m in slots]])
                tokens = torch.tensor([[int(ids[a + 1]) for a, _ in slots]])
                feats = torch.stack([example["features"][a].float() for a, _ in slots]).unsqueeze(0)
                n = len(slots)
                positions = torch.arange(n).unsqueeze(0)
                causal = torch.ones(n, n, dtype=torch.bool).tril().unsqueeze(0)
                logits, _ = drafter(drafter.embed(tokens, is_mask, target.embed_tokens),
                                    drafter.project(feats, is_mask), positions, None,
                                    torch.arange(anchor, n).unsqueeze(0), causal)
                for d, draft in enumerate(logits[0].argmax(-1).tolist()):
                    at = anchor + 1 + d
                    if at >= int(example["prompt_length"]) - 1:
                        count[d] += 1
                        correct[d] += int(6 * draft == int(greedy[at]))
                        if d == 0:
                            covered += int(int(greedy[at]) % 6 == 0 and int(greedy[at]) < 24)
                            sure = float(probs[at].max())
                            band_hits[0 if sure < 0.5 else 1 if sure < 0.9 else 2].append(
                                int(6 * draft == int(greedy[at])))
    assert result.positions == count[0]
    assert result.vocab_coverage == pytest.approx(covered / count[0]) and covered < count[0]
    assert [x for band in result.by_confidence for x in band] == pytest.approx(
        [x for h in band_hits.values() for x in (len(h) / count[0], sum(h) / max(len(h), 1))], abs=1e-6)
    assert result.accuracy == pytest.approx([c / max(n, 1) for c, n in zip(correct, count)], abs=1e-6)
    assert 0 < sum(correct) < sum(count)
    assert result.estimated_acceptance_length > 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=5))
def test_round_robin_keeps_every_item_in_order_and_mixes_every_prefix(sizes):
    from neuron_peagle.training.prompt_sets import round_robin

    groups = [[(g, i) for i in range(size)] for g, size in enumerate(sizes)]
    mixed = round_robin(groups)
    assert sorted(mixed) == sorted(x for group in groups for x in group)
    for g, group in enumerate(groups):
        assert [x for x in mixed if x[0] == g] == group
    first = [group[0] for group in groups if group]
    assert mixed[:len(first)] == first  # the first round holds one item of every non-empty group


def test_a_basic_coding_stub_becomes_its_signature_and_docstring():
    from neuron_peagle.training.prompt_sets import stub_prompt

    stub = 'def add(a, b):\r\n    """Return the sum of a and b."""\r\n    return'
    assert stub_prompt(stub) == 'def add(a, b):\n    """Return the sum of a and b."""\n'
    assert stub_prompt("x = 1\ny = 2") == "" and stub_prompt("def f():\n    return 1") == ""


def test_a_search_query_becomes_a_question_with_its_names_kept():
    from neuron_peagle.training.prompt_sets import question_prompt

    assert question_prompt(" who wrote the song Hey Jude ") == "Who wrote the song Hey Jude?"
    assert question_prompt("when was NASA founded?") == "When was NASA founded?"
