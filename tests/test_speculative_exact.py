"""Greedy speculative decoding is token-for-token identical to transformers' greedy decoding, whatever
the drafter: random (nearly everything rejected), an oracle (everything accepted: the bonus path and
the cache rollback), and one that is right some of the time."""

from __future__ import annotations

import pytest

from conftest import NEW_TOKENS
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import fill_table, table_engine, make_engine

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


# Every K at batch 4 (twelve prompts, mixed lengths in a batch); batch 1, the same graphs at B=1 and
# the slowest way through, at one K on fewer prompts.
CASES = [(1, 4), (3, 4), (7, 4)]


def _count(batch_size):
    return 12 if batch_size > 1 else 8


def _run_table(engine, prompt_ids, hf_greedy, wrong_fraction):
    batch = engine.build.batch_size
    outputs = []
    for first in range(0, len(prompt_ids), batch):
        group, refs = prompt_ids[first:first + batch], hf_greedy[first:first + batch]
        fill_table(engine, group, refs, wrong_fraction, seed=first)
        outputs.extend(engine.generate(group, PARAMS))
    return outputs


def _check(outputs, hf_greedy):
    mismatches = [i for i, (o, ref) in enumerate(zip(outputs, hf_greedy)) if o.output_ids != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"


@pytest.mark.parametrize("k, batch_size", CASES + [(3, 1)])
def test_oracle_and_partly_right_drafters(default_model_dir, prompt_ids, hf_greedy, k, batch_size):
    engine = table_engine(default_model_dir, k, batch_size, max_length=256)
    count = _count(batch_size)
    prompt_ids, hf_greedy = prompt_ids[:count], hf_greedy[:count]
    oracle = _run_table(engine, prompt_ids, hf_greedy, wrong_fraction=0.0)
    _check(oracle, hf_greedy)
    # Everything accepted: every full step commits K+1 tokens.
    assert all(o.stats.acceptance_length > k + 0.5 for o in oracle)
    assert all(min(o.stats.acceptance_per_position) > 0.9 for o in oracle)

    partly = _run_table(engine, prompt_ids, hf_greedy, wrong_fraction=0.3)
    _check(partly, hf_greedy)
    lengths = [o.stats.acceptance_length for o in partly]
    assert 1.0 < min(lengths) and max(lengths) < k + 1


@pytest.fixture(scope="module")
def random_drafter_dir(default_model_dir, tmp_path_factory):
    """An untrained drafter for the default model, saved as a checkpoint like any other."""
    from neuron_peagle.config import DrafterConfig, ModelConfig
    from neuron_peagle.models.drafter_io import save_drafter
    from neuron_peagle.models.target import default_feature_layers
    from neuron_peagle.runtime.drafter_choice import random_drafter

    target = ModelConfig.from_dir(default_model_dir)
    config = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers))
    return save_drafter(random_drafter(config, 256, seed=1), tmp_path_factory.mktemp("random_drafter"))


# (mode, K, batch size, prompts): an untrained drafter's drafts are nearly all rejected, so every step
# takes the rollback path; K=7 at batch 4 on twelve prompts, the rest on fewer.
RANDOM_CASES = [("parallel", 7, 4, 12), ("parallel", 1, 4, 8), ("sequential", 3, 4, 8), ("parallel", 7, 1, 4)]


@pytest.mark.parametrize("mode, k, batch_size, count", RANDOM_CASES)
def test_random_drafter(random_drafter_dir, prompt_ids, hf_greedy, mode, k, batch_size, count):
    engine = make_engine(None, random_drafter_dir, mode=mode, num_speculative_tokens=k,
                                    batch_size=batch_size, max_length=256, prefill_buckets=(64, 128))
    assert engine.drafter is not None
    outputs = engine.generate(prompt_ids[:count], PARAMS)
    _check(outputs, hf_greedy[:count])
    assert all(o.stats.acceptance_length < 1.2 for o in outputs)
