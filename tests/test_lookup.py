"""Context lookup (neuron_peagle.graphs.lookup): the fixed-shape search equals a plain Python search,
and speculative decoding with it stays token-for-token transformers' greedy output, on eager and xla."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NEW_TOKENS, save_tiny_model
from spec_helpers import cycle_ks, make_engine, record_ks, set_step_seconds
from neuron_peagle.errors import ConfigError
from neuron_peagle.datastore import datastore_from_entries
from neuron_peagle.graphs.datastore_lookup import EMPTY
from neuron_peagle.graphs.lookup import LookupProposer, context_lookup
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.runtime.engine import SamplingParams

PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
# Prompts with repeats; from a 64-token random model, outputs whose bigrams sometimes repeat too, so
# adaptive K runs both its step graphs on them.
REPEATING = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 9]]


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_v64"), "llama", vocab_size=64, seed=11)


def reference_lookup(sequence: list[int], ngram: int, k: int, min_ngram: int | None = None) -> list[int | None]:
    """The K tokens after the latest earlier occurrence of the sequence's last n-gram, for the longest n
    from ngram down to min_ngram that occurred (None: unknown)."""
    for n in range(ngram, (min_ngram or ngram) - 1, -1):
        found = _reference_one(sequence, n, k)
        if found is not None:
            return found
    return [None] * k


def _reference_one(sequence: list[int], ngram: int, k: int) -> list[int | None] | None:
    last = len(sequence) - 1
    query = sequence[last - ngram + 1:]
    if last < ngram - 1:
        return None
    for end in range(last - 1, ngram - 2, -1):
        if sequence[end - ngram + 1:end + 1] == query:
            return [sequence[end + i] if end + i <= last else None for i in range(1, k + 1)]
    return None


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 3), st.integers(1, 5), st.integers(0, 3), st.integers(0, 2))
def test_context_lookup_equals_a_python_search(data, ngram, k, garbage, backoff):
    rows = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=3))
    length = 12 + garbage
    history = torch.full((len(rows), length), 7, dtype=torch.int64)  # 7: stale slots past the sequence
    for row, sequence in enumerate(rows):
        history[row, : len(sequence)] = torch.tensor(sequence)
    last = torch.tensor([len(sequence) - 1 for sequence in rows])
    min_ngram = max(1, ngram - backoff)
    tokens, found = context_lookup(history, last, ngram, k, min_ngram)
    for row, sequence in enumerate(rows):
        want = reference_lookup(sequence, ngram, k, min_ngram)
        assert found[row].tolist() == [w is not None for w in want]
        assert [t for t, f in zip(tokens[row].tolist(), found[row].tolist()) if f] == [w for w in want if w is not None]


class FixedDrafts(torch.nn.Module):
    """An inner proposer whose drafts are given: [B, K]."""

    def __init__(self, drafts: torch.Tensor) -> None:
        super().__init__()
        self.drafts = drafts

    def propose(self, state, num_speculative_tokens: int) -> torch.Tensor:
        return self.drafts[:, :num_speculative_tokens]


def reference_proposal(sequence: list[int], inner: list[int], ngram: int,
                       stored: dict[tuple[int, int], int] | None = None) -> list[int]:
    """LookupProposer's drafts: the copies where the committed tokens match, else the inner first draft
    and, after it, the copies that follow the n-gram ending in it, else the datastore's chain after the
    bigram ending in it (`stored`: bigram -> next token); the inner drafts where nothing is known."""
    min_ngram = min(2, ngram)
    copies = reference_lookup(sequence, ngram, len(inner), min_ngram)
    if copies[0] is None:
        after = reference_lookup(sequence + [inner[0]], ngram, len(inner) - 1, min_ngram)
        if after[:1] == [None] and stored is not None and len(inner) > 1:
            chain = sequence + [inner[0]]
            after = []
            while len(after) < len(inner) - 1 and len(chain) >= 2 and tuple(chain[-2:]) in stored:
                chain.append(stored[tuple(chain[-2:])])
                after.append(chain[-1])
            after += [None] * (len(inner) - 1 - len(after))
        copies = [None] + after
    return [d if c is None else c for c, d in zip(copies, inner)]


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 3), st.integers(1, 4), st.booleans())
def test_lookup_proposer_copies_after_the_committed_tokens_or_after_the_first_draft(data, ngram, k, with_store):
    rows = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=10), min_size=1, max_size=3))
    inner = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=k, max_size=k),
                                            min_size=len(rows), max_size=len(rows))))
    max_length = 16
    store = stored = None
    if with_store:  # next tokens (0..5) for some bigrams of tokens 0..5
        keys = data.draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=12, unique=True))
        next_tokens = [data.draw(st.integers(0, 5)) for _ in keys]
        store = datastore_from_entries({2: (torch.tensor(keys), torch.tensor(next_tokens))})
        stored = {tuple(key): token for key, token in zip(store.table.slot_keys.tolist(),
                                                          store.table.slot_next.tolist()) if key[0] != EMPTY}
    proposer = LookupProposer(FixedDrafts(inner), len(rows), max_length, k, ngram, store)
    state = SpecState(len(rows), k, 4, torch.float32)
    proposer.history.fill_(3)  # stale tokens past each sequence
    for row, sequence in enumerate(rows):
        proposer.history[row, : len(sequence)] = torch.tensor(sequence)
        state.pending_tokens[row, -1] = sequence[-1]
    state.last_position.copy_(torch.tensor([len(sequence) - 1 for sequence in rows]))
    proposer.commit(state)
    drafts = proposer.propose(state, k)
    for row, sequence in enumerate(rows):
        assert drafts[row].tolist() == reference_proposal(sequence, inner[row].tolist(), ngram, stored)


def test_lookup_needs_a_speculative_mode_and_a_positive_ngram(tiny_llama_dir):
    with pytest.raises(ConfigError, match="lookup_ngram needs a speculative mode"):
        make_engine(tiny_llama_dir, mode="plain", lookup_ngram=2, max_length=64, prefill_buckets=(16,))
    with pytest.raises(ConfigError, match="lookup_ngram must be >= 0"):
        make_engine(tiny_llama_dir, lookup_ngram=-1, max_length=64, prefill_buckets=(16,))


def test_a_second_k_must_be_shorter_and_plain_step_a_flag(tiny_llama_dir):
    shapes = dict(max_length=64, prefill_buckets=(16,))
    with pytest.raises(ConfigError, match="must be below num_speculative_tokens 4, got 4"):
        make_engine(tiny_llama_dir, num_speculative_tokens=4, lookup_ngram=2, short_draft_tokens=4, **shapes)
    with pytest.raises(ConfigError, match="plain_step must be True, False or 'auto', got 'yes'"):
        make_engine(tiny_llama_dir, plain_step="yes", **shapes)


def test_adaptive_k_runs_both_step_graphs_and_changes_no_token(small_vocab_dir):
    """Steps after a copy-able n-gram draft the long K, the others the short K; the tokens are plain
    greedy decoding's either way, batch 2 with rows of different lengths, and batch 1."""
    shapes = dict(batch_size=2, max_length=96, prefill_buckets=(16, 32))
    plain = make_engine(small_vocab_dir, mode="plain", **shapes)
    adaptive = make_engine(small_vocab_dir, num_speculative_tokens=4, lookup_ngram=2,
                                      short_draft_tokens=1, **shapes)
    set_step_seconds(adaptive, {4: 1.0, 1: 0.6})  # K=4 pays where lookup copies, K=1 elsewhere
    used = record_ks(adaptive)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for batch in (REPEATING, REPEATING[1:]):
        got = adaptive.generate(batch, params)
        assert [o.output_ids for o in got] == [o.output_ids for o in plain.generate(batch, params)]
        assert all(o.stats.num_speculative_tokens == 4 for o in got)
    assert set(used) == {4, 1}


@pytest.mark.slow
def test_lookup_with_the_shipped_drafter_is_exact_and_accepts_more(prompt_ids, hf_greedy):
    """Batch 4, twelve prompts: the same tokens as transformers, and copied drafts raise the
    acceptance length over the drafter alone (every step K=5: the K choice is tested on its own); with
    the shipped n-gram datastore, its drafts change no token either."""
    lengths = {}
    prompt_ids, hf_greedy = prompt_ids[:12], hf_greedy[:12]
    # The drafter alone, and with lookup and the datastore.
    for ngram, short in ((0, 0), (2, 0)):
        engine = make_engine(None, num_speculative_tokens=5, batch_size=4, max_length=256,
                                        prefill_buckets=(64, 128), lookup_ngram=ngram, short_draft_tokens=short,
                                        datastore=bool(ngram))
        used = record_ks(engine)
        outputs = engine.generate(prompt_ids, PARAMS)
        assert set(used) == ({5, 2} if short else {5})
        mismatches = [i for i, (o, ref) in enumerate(zip(outputs, hf_greedy)) if o.output_ids != ref]
        assert not mismatches, (f"lookup_ngram={ngram}, short K {short}: prompts {mismatches} differ from "
                                "transformers' greedy output")
        lengths[ngram, short] = sum(o.stats.acceptance_length for o in outputs) / len(outputs)
    assert lengths[2, 0] > lengths[0, 0] + 0.1, lengths


@pytest.mark.xla
def test_lookup_on_xla_compiles_once_and_equals_eager(tiny_llama_dir):
    # max_length=80 is used by no other test, so none of these graphs can be in torch-xla's cache.
    kwargs = dict(num_speculative_tokens=3, batch_size=2, max_length=80, prefill_buckets=(16, 32), lookup_ngram=1)
    xla = make_engine(tiny_llama_dir, backend="xla", **kwargs)
    eager = make_engine(tiny_llama_dir, **kwargs)
    # Both prompts end in a token seen before, so the first step's drafts are copies (a random target
    # rejects them; the graph path is what is compared).
    prompts = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 9]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    start = xla.backend.compile_count()
    short = xla.generate(prompts[:1], params)
    assert xla.backend.compile_count() - start == 2  # prefill@16 and the step
    both = xla.generate(prompts, params)
    xla.generate(prompts[::-1], params)
    assert xla.backend.compile_count() - start == 3  # + prefill@32; the step graph is reused
    assert [o.output_ids for o in short] == [o.output_ids for o in eager.generate(prompts[:1], params)]
    want = eager.generate(prompts, params)
    assert [o.output_ids for o in both] == [o.output_ids for o in want]


def test_k_is_chosen_by_the_occupied_slots_only(small_vocab_dir):
    """A free slot (never filled, or finished) never steers the K choice: its copied drafts do not count."""
    engine = make_engine(small_vocab_dir, num_speculative_tokens=3, lookup_ngram=2, short_draft_tokens=1,
                         batch_size=2, max_length=96, prefill_buckets=(32,))
    set_step_seconds(engine, {3: 1.0, 1: 0.7})
    runner = engine.runner
    runner.admit(0, REPEATING[0], PARAMS)  # slot 1 stays free
    chosen = []
    choose = runner.chooser.choose
    runner.chooser.choose = lambda known: chosen.append(known) or choose(known)
    runner._known_drafts = torch.tensor([0, 3])
    runner.step()
    runner.retire(0)
    runner.step()
    assert chosen == [[0], []]
    assert choose([3]).k == 3 and choose([0]).k == 1  # what slot 1's copies would have chosen, and slot 0's


@pytest.mark.xla
def test_adaptive_k_on_xla_compiles_one_graph_per_k_and_equals_eager(small_vocab_dir):
    # max_length=88 is used by no other test, so none of these graphs can be in torch-xla's cache.
    kwargs = dict(num_speculative_tokens=3, batch_size=2, max_length=88, prefill_buckets=(32,), lookup_ngram=2,
                  short_draft_tokens=1)
    xla = make_engine(small_vocab_dir, backend="xla", **kwargs)
    eager = make_engine(small_vocab_dir, **kwargs)
    used = record_ks(xla)
    for engine in (xla, eager):
        cycle_ks(engine, [3, 1, 1])
    prompts = REPEATING
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    start = xla.backend.compile_count()
    got = xla.generate(prompts, params)
    assert set(used) == {3, 1}
    assert xla.backend.compile_count() - start == 3  # the prefill and one step graph per K
    xla.generate(prompts[::-1], params)
    assert xla.backend.compile_count() - start == 3
    assert [o.output_ids for o in got] == [o.output_ids for o in eager.generate(prompts, params)]
