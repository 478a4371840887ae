"""The host loop overlapping the next step with reading the last one (runtime.host_loop, overlap=True).

Every request's tokens, text and finish reason equal the synchronous loop's, in every mode, greedy and
seeded sampling, with stop tokens and stop strings ending rows mid-step, slots refilled one step later.
"""

from __future__ import annotations

import threading

import pytest

from conftest import save_tiny_model
from neuron_peagle.errors import ConfigError
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import cycle_ks, make_engine

SHAPES = dict(max_length=96, prefill_buckets=(16, 32))
PROMPTS = [[5, 6, 7], list(range(20, 45)), [8, 9, 8, 9, 8], [30, 31], [1, 2, 3, 4, 1, 2, 3], [40] * 12]
LENGTHS = [5, 30, 12, 1, 24, 7]
MODES = {
    "plain": dict(mode="plain"),
    "parallel": dict(mode="parallel", num_speculative_tokens=4, lookup_ngram=2, short_draft_tokens=2, plain_step=True),
    "sequential": dict(mode="sequential", num_speculative_tokens=3),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("overlap"), "llama", vocab_size=64, seed=5)


def _outputs(engine, params, overlap: bool, ks: list[int] | None = None):
    if ks is not None:
        cycle_ks(engine, ks)  # the same K sequence in both loops: a sampled draft depends on K
    outputs = engine.generate(PROMPTS, params, overlap_host=overlap)
    return [(o.output_ids, o.text, o.stats.finish_reason) for o in outputs]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_overlap_gives_the_synchronous_tokens(model_dir, mode, batch_size):
    engine = make_engine(model_dir, batch_size=batch_size, **SHAPES, **MODES[mode])
    ks = None if mode != "parallel" else [4]
    greedy = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in LENGTHS]
    seeded = [SamplingParams(max_new_tokens=n, temperature=0.8, top_k=30, seed=11 + i, ignore_eos=True)
              for i, n in enumerate(LENGTHS)]
    for params in (greedy, seeded):
        synchronous = _outputs(engine, params, False, ks)
        assert _outputs(engine, params, True, ks) == synchronous
    # Stop tokens and stop strings that end rows inside a step (taken from the greedy outputs themselves).
    reference = _outputs(engine, greedy, False, ks)
    stopping = []
    for (ids, text, _), n in zip(reference, LENGTHS):
        middle = ids[len(ids) // 2] if len(ids) > 2 else None
        cut = text[len(text) // 2:len(text) // 2 + 2].strip()
        stopping.append(SamplingParams(max_new_tokens=n, ignore_eos=True, stop=(cut,) if cut else (),
                                       stop_token_ids=(middle,) if middle is not None else None))
    synchronous = _outputs(engine, stopping, False, ks)
    assert any(reason == "stop" for _, _, reason in synchronous)
    assert _outputs(engine, stopping, True, ks) == synchronous


def test_the_host_reads_beside_the_step_and_a_finished_slot_waits_one_step(model_dir):
    engine = make_engine(model_dir, batch_size=2, mode="plain", **SHAPES)
    step_threads, read_threads, records = set(), set(), []
    step = engine.runner.step

    def watched_step():
        step_threads.add(threading.current_thread().name)
        return step()

    def on_step(record):
        read_threads.add(threading.current_thread().name)
        records.append(record)

    engine.runner.step = watched_step
    lengths = [3, 20, 4]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    engine.generate(PROMPTS[:3], params, on_step=on_step, overlap_host=True)
    # The steps stay on the calling thread (one OpenMP team); the reads run on the reader.
    assert step_threads == {threading.current_thread().name}
    assert read_threads and all(name.startswith("peagle-read") for name in read_threads)
    held = [record.requests for record in records]
    # Request 0 (3 tokens: its prefill's and 2 steps) ends in step 1, read while step 2 runs: step 2's
    # token for it is dropped (the slot shows no request), and request 2 enters before step 3.
    assert held[:2] == [[0, 1], [0, 1]] and held[2] == [None, 1] and held[3] == [2, 1]
    assert records[2].kept == [0, 1]
    synchronous = []
    engine.runner.step = step
    engine.generate(PROMPTS[:3], params, on_step=synchronous.append, overlap_host=False)
    assert [r.requests for r in synchronous][2] == [2, 1]  # refilled at once without overlap


def test_no_step_is_wasted_when_every_row_ends_at_its_length(model_dir):
    """The last step of a request that ends at max_new_tokens is read before another step starts."""
    engine = make_engine(model_dir, batch_size=1, mode="plain", **SHAPES)
    counts = {}
    for overlap in (False, True):
        records = []
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, ignore_eos=True), on_step=records.append,
                        overlap_host=overlap)
        counts[overlap] = len(records)
    assert counts[True] == counts[False] == 5


def test_an_error_in_a_callback_waits_for_the_running_step(model_dir):
    engine = make_engine(model_dir, batch_size=1, mode="plain", **SHAPES)
    running = []
    step = engine.runner.step
    engine.runner.step = lambda: (running.append(1), step(), running.pop())[1]

    calls = []

    def fail(index, tokens):  # the prefill's token and the first step's pass; the second step's fails
        calls.append(tokens)
        if len(calls) == 3:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20, ignore_eos=True), on_tokens=fail,
                        overlap_host=True)
    assert running == []  # no step left running behind the error


def test_overlap_is_refused_where_the_backend_cannot(model_dir):
    engine = make_engine(model_dir, batch_size=1, mode="plain", **SHAPES)
    capabilities = engine.backend.capabilities
    assert capabilities.host_overlap == "allowed"
    try:
        object.__setattr__(capabilities, "host_overlap", "off")
        with pytest.raises(ConfigError, match="overlap_host"):
            engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3), overlap_host=True)
        assert engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0].output_ids  # None: off there
        object.__setattr__(capabilities, "host_overlap", "on")
        threads = set()
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, ignore_eos=True),
                        on_step=lambda record: threads.add(threading.current_thread().name))
        assert threads and all(name.startswith("peagle-read") for name in threads)  # None: on there
    finally:
        object.__setattr__(capabilities, "host_overlap", "allowed")
