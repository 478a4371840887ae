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
