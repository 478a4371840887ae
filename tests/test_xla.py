"""The xla backend: a fixed set of graphs (one per used prefill bucket + one decode), no recompiles
during decode, and the same tokens as eager."""

from __future__ import annotations

import pytest

from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine

pytestmark = pytest.mark.xla  # the whole file runs backend xla: the torch-xla environment (.venv-xla)

PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)
SHORT = [[5, 6, 7], [8, 9, 10, 11, 12]]  # bucket 16
LONG = [list(range(20, 45)), list(range(50, 80))]  # bucket 32


@pytest.fixture(scope="module")
def xla_engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, mode="plain", batch_size=2, max_length=64,
                                  prefill_buckets=(16, 32), backend="xla")


def test_compiles_one_graph_per_bucket_plus_decode_and_none_while_decoding(xla_engine):
    backend = xla_engine.backend
    start = backend.compile_count()
    xla_engine.generate(SHORT, PARAMS)
    assert backend.compile_count() - start == 2  # prefill@16 + decode

    xla_engine.generate(LONG, PARAMS)
    assert backend.compile_count() - start == 3  # + prefill@32, decode reused

    # Longer generations and new prompts in known buckets compile nothing at all.
    xla_engine.generate(SHORT + LONG, SamplingParams(max_new_tokens=30, ignore_eos=True))
    xla_engine.generate([[3] * 9, [4] * 30], PARAMS)
    assert backend.compile_count() - start == 3


def test_xla_tokens_equal_eager(xla_engine, tiny_llama_dir):
    eager = make_engine(tiny_llama_dir, mode="plain", batch_size=2, max_length=64,
                                   prefill_buckets=(16, 32))
    prompts = SHORT + LONG + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    got = [o.output_ids for o in xla_engine.generate(prompts, PARAMS)]
    want = [o.output_ids for o in eager.generate(prompts, PARAMS)]
    assert got == want


@pytest.mark.slow
def test_default_model_xla_equals_eager(default_model_dir):
    prompts = ["What is the capital of France?", "Write a haiku about the sea, please, in English."]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    xla = make_engine(mode="plain", batch_size=2, max_length=128, prefill_buckets=(32, 64),
                                 backend="xla")
    eager = make_engine(mode="plain", batch_size=2, max_length=128, prefill_buckets=(32, 64))
    start = xla.backend.compile_count()
    got = [o.output_ids for o in xla.generate(prompts, params)]
    assert xla.backend.compile_count() - start == 2
    assert got == [o.output_ids for o in eager.generate(prompts, params)]


def test_speculative_generation_compiles_buckets_plus_one_step_graph(tiny_llama_dir):
    # The compile counter is per process and torch-xla caches graphs by HLO: these shapes (max_length=88)
    # are used by no other test, so no earlier test can have compiled these graphs already.
    engine = make_engine(tiny_llama_dir, mode="parallel", num_speculative_tokens=3, batch_size=2,
                                    max_length=88, prefill_buckets=(16, 32), backend="xla")
    import torch_xla.debug.metrics as metrics

    backend = engine.backend
    start = backend.compile_count()
    engine.generate(SHORT, PARAMS)
    assert backend.compile_count() - start == 2  # prefill@16 + the speculative step
    engine.generate(LONG, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert backend.compile_count() - start == 3  # + prefill@32; the step graph is reused
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=3, ignore_eos=True)
    engine.generate(SHORT + LONG, sampled)
    assert backend.compile_count() - start == 6  # the sampling variants: prefill@16, @32, the step
    engine.generate(LONG + SHORT, SamplingParams(max_new_tokens=30, temperature=0.5, seed=4))
    engine.generate(SHORT, PARAMS)
    assert backend.compile_count() - start == 6
    assert metrics.executed_fallback_ops() == []  # every op lowered to XLA, none ran on the host


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_speculative_xla_tokens_equal_eager(tiny_llama_dir, mode):
    kwargs = dict(mode=mode, num_speculative_tokens=3, batch_size=2, max_length=96, prefill_buckets=(16, 32))
    xla = make_engine(tiny_llama_dir, backend="xla", **kwargs)
    eager = make_engine(tiny_llama_dir, **kwargs)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = [o.output_ids for o in xla.generate(SHORT + LONG, params)]
    assert got == [o.output_ids for o in eager.generate(SHORT + LONG, params)]


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_moe_targets_on_xla_equal_eager_with_every_op_lowered(tmp_path, family):
    """The trn1 path for the MoE targets: P-EAGLE graphs of a tiny gpt-oss (sinks, rings, grouped
    experts) and Qwen3-MoE trace to XLA with no op left on the host, compile once per shape, and give
    eager's tokens (a batch of 2 with a third prompt: the second batch reuses every graph)."""
    import torch_xla.debug.metrics as metrics

    from conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", family, tie=False, seed=5)
    kwargs = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=64, prefill_buckets=(16,))
    xla = make_engine(model_dir, backend="xla", **kwargs)
    start = xla.backend.compile_count()  # the backend counts for the whole process
    prompts = [[5, 9, 13, 40], [7, 300, 11], [31, 32]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = [o.output_ids for o in xla.generate(prompts, params)]
    assert got == [o.output_ids for o in make_engine(model_dir, **kwargs).generate(prompts, params)]
    assert xla.backend.compile_count() - start == 2  # prefill@16 and the step
    assert metrics.executed_fallback_ops() == []
