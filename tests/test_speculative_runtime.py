"""The speculative runtime on tiny models: KV-cache state equals plain decoding after every step,
seeded sampling is reproducible, and sampled output is distributed as plain sampling's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import save_tiny_model
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import fill_table, make_engine, record_ks, table_engine

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def _plain_reference(model_dir, new_tokens):
    engine = make_engine(model_dir, mode="plain", batch_size=2, max_length=96, prefill_buckets=(16,))
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [o.output_ids for o in outputs], engine.runner.cache


@pytest.mark.parametrize("drafter", ["random", "partly_right"])
def test_target_cache_at_committed_positions_equals_plain_decoding(tiny_llama_dir, drafter):
    new_tokens = 40
    reference, plain_cache = _plain_reference(tiny_llama_dir, new_tokens)
    if drafter == "random":
        engine = make_engine(tiny_llama_dir, mode="parallel", num_speculative_tokens=3, batch_size=2,
                                        max_length=96, prefill_buckets=(16,))
    else:
        engine = table_engine(tiny_llama_dir, 3, 2, max_length=96, buckets=(16,))
        fill_table(engine, PROMPTS, reference, wrong_fraction=0.3)
    runner = engine.runner
    for slot, prompt in enumerate(PROMPTS):
        runner.admit(slot, prompt, SamplingParams())
    committed = [1, 1]
    for _ in range(12):
        tokens, counts = runner.step()
        for row, prompt in enumerate(PROMPTS):
            got = tokens[row, : int(counts[row])].tolist()
            assert got == reference[row][committed[row]: committed[row] + len(got)]
            committed[row] += len(got)
            written = len(prompt) + committed[row] - 1  # every committed token but the last has KV
            for layer in range(runner.cache.num_layers):
                for ours, theirs in zip(runner.cache.layer(layer), plain_cache.layer(layer)):
                    assert torch.allclose(ours[row, :, :written], theirs[row, :, :written], atol=1e-5), (
                        f"layer {layer} row {row} differs within the first {written} positions")
        if min(committed) >= new_tokens - 4:
            break
    assert min(committed) > 12  # the steps really committed several tokens each at times


SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)


@pytest.mark.parametrize("mode", ["plain", "parallel", "sequential"])
def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama_dir, mode):
    engine = make_engine(tiny_llama_dir, mode=mode, num_speculative_tokens=3, batch_size=2,
                                    max_length=64, prefill_buckets=(16,))
    first = engine.generate([[5, 6, 7], [40, 41]], SAMPLED)[0].output_ids
    again = engine.generate([[5, 6, 7], [90, 91, 92, 93]], SAMPLED)[0].output_ids
    other_seed = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40,
                                                             top_p=0.9, seed=99, ignore_eos=True))[0]
    assert first == again
    assert other_seed.output_ids != first


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_v64"), "llama", vocab_size=64, seed=11)


def _histograms(engine, samples: int, positions: int, prompt: tuple[int, ...] = (3, 4, 5)) -> torch.Tensor:
    counts = torch.zeros(positions, 64)
    params = SamplingParams(max_new_tokens=positions, temperature=1.0, ignore_eos=True)
    per_call = engine.build.batch_size
    accepted = 0
    for _ in range(samples // per_call):
        outputs = engine.generate([list(prompt)] * per_call, params)
        for out in outputs:
            for j, token in enumerate(out.output_ids[:positions]):
                counts[j, token] += 1
            accepted += sum(out.stats.accepted_per_position)
    engine.accepted_total = accepted
    return counts


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    both = a + b
    used = both > 0
    na, nb = a.sum(), b.sum()
    stat = (((a * (nb / na).sqrt() - b * (na / nb).sqrt()) ** 2)[used] / both[used]).sum()
    return float(stat), int(used.sum()) - 1


def test_speculative_sampling_matches_plain_sampling_distribution(small_vocab_dir):
    kwargs = dict(batch_size=16, max_length=32, prefill_buckets=(8,))
    plain = make_engine(small_vocab_dir, mode="plain", **kwargs)
    spec = make_engine(small_vocab_dir, mode="parallel", num_speculative_tokens=2, **kwargs)
    samples, positions = 1600, 4
    hist_plain = _histograms(plain, samples, positions)
    hist_spec = _histograms(spec, samples, positions)
    # Both accepted drafts and recovered tokens occurred, so both paths were exercised.
    assert 0 < spec.accepted_total < samples * (positions - 1)
    for j in range(1, positions):
        stat, dof = _chi2_two_sample(hist_plain[j], hist_spec[j])
        assert stat < dof + 6 * (2 * dof) ** 0.5, f"position {j}: chi2 {stat:.1f} with {dof} dof"
    # The test has power: a distribution that is really different fails it.
    shifted = hist_plain[1].roll(1)
    stat, dof = _chi2_two_sample(shifted, hist_spec[1])
    assert stat > dof + 6 * (2 * dof) ** 0.5


def test_sampling_with_context_lookup_drafts_matches_plain_sampling_distribution(small_vocab_dir):
    """Lookup drafts are deterministic guesses (a one-hot draft distribution): accepting them with
    probability p(draft) and sampling the residual otherwise keeps the target's distribution."""
    kwargs = dict(batch_size=16, max_length=40, prefill_buckets=(16,))
    prompt = (3, 4, 5, 9, 3, 4, 5, 9, 3, 4, 5)  # the last token repeats: lookup drafts "9 3" at once
    plain = make_engine(small_vocab_dir, mode="plain", **kwargs)
    spec = make_engine(small_vocab_dir, mode="parallel", num_speculative_tokens=2, lookup_ngram=1, **kwargs)
    samples, positions = 1600, 4
    hist_plain = _histograms(plain, samples, positions, prompt)
    hist_spec = _histograms(spec, samples, positions, prompt)
    assert 0 < spec.accepted_total < samples * (positions - 1)
    for j in range(positions):
        stat, dof = _chi2_two_sample(hist_plain[j], hist_spec[j])
        assert stat < dof + 6 * (2 * dof) ** 0.5, f"position {j}: chi2 {stat:.1f} with {dof} dof"


def test_sampling_with_adaptive_k_matches_plain_sampling_distribution(small_vocab_dir):
    """Adaptive K picks each step's K from tokens already committed, never from the step's own
    randomness, so switching between the long and the short step graph keeps the distribution."""
    kwargs = dict(batch_size=16, max_length=40, prefill_buckets=(16,))
    plain = make_engine(small_vocab_dir, mode="plain", **kwargs)
    spec = make_engine(small_vocab_dir, mode="parallel", num_speculative_tokens=2, lookup_ngram=2,
                                  short_draft_tokens=1, **kwargs)
    used = record_ks(spec)
    # The choice turns on what lookup knows of the committed tokens (K=2 where some slot's drafts are
    # copies), as the cost model's does, but not on this machine's step times, which decide whether the
    # measured-cost choice ever switches here.
    chooser = spec.runner.chooser
    measured_choice = chooser.choose
    chooser.choose = lambda known: dataclasses.replace(measured_choice(known), k=2 if any(known) else 1)
    samples, positions = 1600, 4
    hist_plain = _histograms(plain, samples, positions)
    hist_spec = _histograms(spec, samples, positions)
    assert set(used) == {1, 2}  # the prompt's last bigram is new: the first step is short, later ones vary
    assert 0 < spec.accepted_total < samples * (positions - 1)
    for j in range(positions):
        stat, dof = _chi2_two_sample(hist_plain[j], hist_spec[j])
        assert stat < dof + 6 * (2 * dof) ** 0.5, f"position {j}: chi2 {stat:.1f} with {dof} dof"


@pytest.mark.parametrize("mode", ["plain", "parallel"])
def test_eager_attention_window_changes_no_token(tiny_llama_dir, mode, monkeypatch):
    """Eager attention reads only the live part of the cache (rounded up to 128 slots): the same tokens,
    greedy and sampled, as reading all of it, across window boundaries and with rows of different lengths."""
    from neuron_peagle.kv_cache import KVCache

    kwargs = dict(mode=mode, num_speculative_tokens=3, batch_size=2, max_length=384, prefill_buckets=(64, 160))
    # Batches [short, long] (bucket 160: windows from 256) and [short] (bucket 64: from 128).
    prompts = [list(range(3, 20)), list(range(40, 180)), list(range(7, 30))]
    params = [SamplingParams(max_new_tokens=120, ignore_eos=True),
              SamplingParams(max_new_tokens=120, temperature=0.8, top_k=40, seed=5, ignore_eos=True)]
    seen = []
    rounded = KVCache.rounded_read_length

    def spy(self, last_slot):
        seen.append(rounded(self, last_slot))
        return seen[-1]

    monkeypatch.setattr(KVCache, "rounded_read_length", spy)
    engine = make_engine(tiny_llama_dir, **kwargs)
    narrowed = [[o.output_ids for o in engine.generate(prompts, p)] for p in params]
    assert min(seen) == 128 and 256 in seen and max(seen) == 384  # narrow at first, full cache by the end
    monkeypatch.setattr(KVCache, "rounded_read_length", lambda self, last_slot: self.max_length)
    engine = make_engine(tiny_llama_dir, **kwargs)
    assert narrowed == [[o.output_ids for o in engine.generate(prompts, p)] for p in params]
    assert len(narrowed[0][0]) == 120


def test_the_timed_step_runs_the_step_graphs_parts_with_a_clock_and_changes_nothing(tiny_llama_dir):
    """Eager times a step through TimedStep (runtime.step_parts), which runs SpecStepGraph.run_parts with
    a timer, as `forward` runs it without one: the same outputs and new state, each part timed, in order."""
    from contextlib import contextmanager

    from neuron_peagle.graphs.interface import plan
    from neuron_peagle.runtime.step_parts import PARTS, TimedStep

    engine = make_engine(tiny_llama_dir, mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=96,
                         prefill_buckets=(16,))
    for slot, prompt in enumerate(PROMPTS):
        engine.runner.admit(slot, prompt, SamplingParams())
    spec = next(s for s in plan(engine.runner) if s.name == "spec_step_sampling")
    start = {name: b.clone() for name, b in spec.state_buffers.items()}
    results = []
    for run in ("forward", "timed", "named"):
        for name, value in start.items():
            spec.module.get_buffer(name).copy_(value)
        timings: dict[str, float] = {}
        names: list[str] = []

        @contextmanager
        def record(name):
            names.append(name)
            yield

        with torch.inference_mode():
            if run == "forward":
                outputs = spec.module(*spec.example_inputs)
            elif run == "timed":
                outputs = TimedStep(spec.module, timings)(*spec.example_inputs)
            else:
                outputs = spec.module.run_parts(spec.example_inputs, record)
        results.append((outputs, {name: b.clone() for name, b in spec.state_buffers.items()}))
        if run == "timed":
            assert set(timings) == set(PARTS) and all(t > 0 for t in timings.values())
        if run == "named":
            assert names == list(PARTS)
    (want, want_state), *others = results
    assert any(not torch.equal(want_state[n], start[n]) for n in start)
    for got, state in others:
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert all(torch.equal(state[n], want_state[n]) for n in want_state)
