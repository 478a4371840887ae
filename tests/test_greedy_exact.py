"""Greedy generation is token-for-token identical to transformers' own greedy `generate`."""

from __future__ import annotations

import pytest
import torch

from prompts import PROMPTS

NEW_TOKENS = 64
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_b1():
    from neuron_peagle.runtime.engine import Engine

    return Engine.from_pretrained(batch_size=1, max_length=256, prefill_buckets=(64, 128))


@pytest.fixture(scope="module")
def prompt_ids(engine_b1):
    return [engine_b1.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_default_model, prompt_ids):
    """transformers' greedy continuation of each prompt, one at a time (no padding involved)."""
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            # The prompt contains token 2 (<|im_end|>), which is also the pad id: give the mask
            # explicitly or transformers infers one that hides those tokens.
            ids_t = torch.tensor([ids])
            out = hf_default_model.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                            max_new_tokens=NEW_TOKENS, do_sample=False,
                                            eos_token_id=None, pad_token_id=2)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def _params():
    from neuron_peagle.runtime.engine import SamplingParams

    return SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


def test_batch1_matches_transformers(engine_b1, prompt_ids, hf_greedy):
    outs = engine_b1.generate(prompt_ids, _params())
    mismatches = [i for i, (o, ref) in enumerate(zip(outs, hf_greedy)) if o.output_ids != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"
    assert all(len(o.output_ids) == NEW_TOKENS for o in outs)


def test_batch4_with_different_lengths_matches_transformers(prompt_ids, hf_greedy):
    from neuron_peagle.runtime.engine import Engine

    engine = Engine.from_pretrained(batch_size=4, max_length=256, prefill_buckets=(64, 128))
    lengths = {len(ids) for ids in prompt_ids[:4]}
    assert len(lengths) > 1, "the first batch must mix prompt lengths"
    outs = engine.generate(prompt_ids, _params())
    mismatches = [i for i, (o, ref) in enumerate(zip(outs, hf_greedy)) if o.output_ids != ref]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"
