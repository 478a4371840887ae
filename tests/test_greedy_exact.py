"""Greedy generation is token-for-token identical to transformers' own greedy `generate`."""

from __future__ import annotations

import pytest

from conftest import NEW_TOKENS
from spec_helpers import make_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_b1():

    return make_engine(mode="plain", batch_size=1, max_length=256, prefill_buckets=(64, 128))


def _params():
    from neuron_peagle.runtime.engine import SamplingParams

    return SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


def test_batch1_matches_transformers(engine_b1, prompt_ids, hf_greedy):
    # The first eight prompts one at a time; batch 4 below runs all twenty.
    assert len(prompt_ids) >= 20
    prompt_ids, hf_greedy = prompt_ids[:8], hf_greedy[:8]
    outs = engine_b1.generate(prompt_ids, _params())
    mismatches = [i for i, (o, ref) in enumerate(zip(outs, hf_greedy)) if o.output_ids != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"
    assert all(len(o.output_ids) == NEW_TOKENS for o in outs)


def test_batch4_with_different_lengths_matches_transformers(prompt_ids, hf_greedy):

    engine = make_engine(mode="plain", batch_size=4, max_length=256, prefill_buckets=(64, 128))
    lengths = {len(ids) for ids in prompt_ids[:4]}
    assert len(lengths) > 1, "the first batch must mix prompt lengths"
    outs = engine.generate(prompt_ids, _params())
    mismatches = [i for i, (o, ref) in enumerate(zip(outs, hf_greedy)) if o.output_ids != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"


def test_peagle_slots_in_a_shuffled_order_match_transformers(prompt_ids, hf_greedy):
    """The command line's P-EAGLE (context lookup, datastore, K chosen per step among 7, 3 and 0) on four
    slots: twelve requests of mixed lengths in a shuffled order, each token for token what transformers
    gives it alone, whatever slot and neighbours it had."""
    import random

    from neuron_peagle.runtime.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(batch_size=4, max_length=256, prefill_buckets=(64, 128))
    assert engine.speculation.step_ks == (7, 3, 0)
    order = list(range(12))
    random.Random(3).shuffle(order)
    lengths = {i: 8 + (i * 23) % (NEW_TOKENS - 7) for i in order}  # 8..64
    outs = engine.generate([prompt_ids[i] for i in order],
                           [SamplingParams(max_new_tokens=lengths[i], ignore_eos=True) for i in order])
    mismatches = [i for i, out in zip(order, outs) if out.output_ids != hf_greedy[i][:lengths[i]]]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"
