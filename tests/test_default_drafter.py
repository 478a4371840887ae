"""The drafter shipped for the default model: intact, as recorded, and accepted often enough."""

from __future__ import annotations

import json

import pytest

from neuron_peagle.default_model import sha256_of
from neuron_peagle.runtime.drafter_choice import DEFAULT_DRAFTER_DIR
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine

pytestmark = pytest.mark.slow

FIXED_PROMPTS = [
    "Write a Python function that returns the sum of the squares of a list of numbers.",
    "Write a python function to find the maximum of three numbers.",
    "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples does he have left?",
    "Write a function to check whether a string is a palindrome.",
]


def test_shipped_drafter_matches_its_record():
    record = json.loads((DEFAULT_DRAFTER_DIR / "checksums.json").read_text())
    for name, digest in record.items():
        assert sha256_of(DEFAULT_DRAFTER_DIR / name) == digest, f"{name} changed since training"
    config = json.loads((DEFAULT_DRAFTER_DIR / "config.json").read_text())
    training = json.loads((DEFAULT_DRAFTER_DIR / "training.json").read_text())["train_config"]
    assert config["speculators_model_type"] == "peagle"
    assert config["transformer_layer_config"]["num_hidden_layers"] == training["num_layers"]
    assert config["draft_vocab_size"] == training["draft_vocab_size"]
    assert (DEFAULT_DRAFTER_DIR / "model.safetensors").stat().st_size < 30 * 2**20
    assert "datastore.safetensors" in record  # the n-gram datastore ships beside the weights, recorded too


def test_shipped_drafter_is_the_default_and_gets_accepted(default_model_dir):
    engine = make_engine(num_speculative_tokens=5, batch_size=4, max_length=320,
                                    prefill_buckets=(128,))
    assert engine.drafter.path == DEFAULT_DRAFTER_DIR
    plain = make_engine(mode="plain", batch_size=4, max_length=320, prefill_buckets=(128,))
    params = SamplingParams(max_new_tokens=96, ignore_eos=True)
    outputs = engine.generate(FIXED_PROMPTS, params)
    assert [o.output_ids for o in outputs] == [o.output_ids for o in plain.generate(FIXED_PROMPTS, params)]
    mean_length = sum(o.stats.acceptance_length for o in outputs) / len(outputs)
    # A sanity bar that a trained drafter clears and a random one (~1.0) does not. The shipped drafter
    # (round 16) reaches 2.54 on these prompts, float32 (1.7-1.9 on held-out benchmark prompts); round 8
    # reached 2.43, an earlier, less trained one 1.96.
    assert mean_length >= 2.0, f"acceptance length {mean_length:.2f}"
