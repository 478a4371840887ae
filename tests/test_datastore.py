"""The n-gram datastore: built as counted, looked up in fixed shapes as a dict would be, refused when
it does not fit the target, and lossless inside speculative decoding on eager and xla."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import save_tiny_model
from neuron_peagle.checksums import CHECKSUMS_FILE
from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.datastore import (DATASTORE_FILE, DatastoreConfig, build_entries, datastore_from_entries,
                                     hash_table, load_datastore, save_datastore)
from neuron_peagle.errors import ConfigError, ModelDirError, WeightsError
from neuron_peagle.graphs.datastore_lookup import EMPTY, PAD
from neuron_peagle.models.drafter_io import save_drafter
from neuron_peagle.models.target import default_feature_layers
from neuron_peagle.runtime.drafter_choice import random_drafter
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine


def test_entries_keep_frequent_ngrams_and_their_most_frequent_next_token():
    sequences = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4]]
    keys, next_tokens = build_entries(sequences, DatastoreConfig(max_order=2, min_order=2, min_count=2))[2]
    # (2, 3) seen 4 times (then 4 three times, 5 once), (1, 2) 3 times; (9, 2) once: left out; (3, 4)
    # ends every answer, so nothing follows it.
    assert keys.tolist() == [[2, 3], [1, 2]]
    assert next_tokens.tolist() == [4, 3]
    keys, next_tokens = build_entries(sequences, DatastoreConfig(max_order=2, min_order=2, min_count=1))[2]
    assert keys.tolist() == [[2, 3], [1, 2], [9, 2]] and next_tokens.tolist() == [4, 3, 3]


def test_chains_follow_the_longest_known_ngram_at_every_token():
    sequences = [[7, 1, 2, 5, 9]] * 2 + [[8, 1, 2, 6]] * 3
    entries = build_entries(sequences, DatastoreConfig(max_order=3, min_order=2, min_count=2))
    store = datastore_from_entries(entries)
    history = torch.tensor([[7, 1, 2, 0], [4, 1, 2, 0], [0, 2, 5, 0], [2, 0, 0, 0]])
    tokens, found = store.lookup(history, torch.tensor([2, 2, 2, 0]), 3)
    # (7, 1, 2) -> 5 though the bigram (1, 2) -> 6; then (1, 2, 5) -> 9, then (2, 5, 9) is unknown and
    # so is (5, 9): the chain stops. (4, 1, 2) is unknown: the bigram serves. A single token is no key.
    assert tokens.tolist() == [[5, 9, EMPTY], [6, EMPTY, EMPTY], [9, EMPTY, EMPTY], [EMPTY] * 3]
    assert found.tolist() == [[True, True, False], [True, False, False], [True, False, False], [False] * 3]


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3), st.integers(1, 40))
def test_hash_table_lookup_equals_a_dict(data, order, count):
    keys = data.draw(st.lists(st.tuples(*[st.integers(0, 300)] * order), min_size=count, max_size=count, unique=True))
    next_tokens = [data.draw(st.integers(0, 300)) for _ in keys]
    table = hash_table(torch.tensor(keys).reshape(len(keys), order), torch.tensor(next_tokens))
    stored = {tuple(k) for k in table.slot_keys.tolist() if k[0] != EMPTY}
    assert len(stored) >= 0.9 * len(keys)  # at most a few entries dropped by full probe windows
    absent = data.draw(st.lists(st.tuples(*[st.integers(0, 300)] * order), min_size=1, max_size=10))
    queries = keys + [a for a in absent if a not in keys]
    got = table.lookup(torch.tensor(queries).reshape(len(queries), order)).tolist()
    want = dict(zip(keys, next_tokens))
    for query, token in zip(queries, got):
        assert token == (want[query] if query in stored else EMPTY)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=12), min_size=1, max_size=6),
       st.lists(st.integers(0, 4), min_size=1, max_size=6), st.integers(1, 5))
def test_datastore_chains_equal_a_python_chain_of_the_entries(sequences, context, k):
    config = DatastoreConfig(max_order=3, min_order=2, min_count=1)
    entries = build_entries(sequences, config)
    store = datastore_from_entries(entries)
    known = {2: {}, 3: {}}  # what the hash table holds, by order
    for key, token in zip(store.table.slot_keys.tolist(), store.table.slot_next.tolist()):
        if key[0] != EMPTY:
            ngram = tuple(t for t in key if t != PAD)
            known[len(ngram)][ngram] = token
    chain = list(context)
    for _ in range(k):  # the longest known n-gram at the end of what is there so far
        token = next((known[n][tuple(chain[-n:])] for n in (3, 2) if len(chain) >= n and tuple(chain[-n:]) in known[n]),
                     None)
        if token is None:
            break
        chain.append(token)
    want = chain[len(context):]
    history = torch.tensor([context + [0] * 3])
    tokens, found = store.lookup(history, torch.tensor([len(context) - 1]), k)
    assert tokens[0, :len(want)].tolist() == want and found[0].tolist() == [i < len(want) for i in range(k)]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("datastore") / DATASTORE_FILE
    config = DatastoreConfig(max_order=2, min_order=2, min_count=1)
    save_datastore(build_entries([[1, 2, 3, 4, 5]], config), path, 64, config, "test")
    return path


def test_loading_checks_file_vocabulary_and_ids(store_path, tmp_path):
    assert load_datastore(store_path, 64).lookup(torch.tensor([[1, 2]]), torch.tensor([1]), 2)[0].tolist() == [[3, 4]]
    with pytest.raises(ModelDirError, match="no n-gram datastore"):
        load_datastore(tmp_path / "missing.safetensors", 64)
    with pytest.raises(ConfigError, match="built for a vocabulary of 64 tokens; the target has 100"):
        load_datastore(store_path, 100)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(store_path.read_bytes()[:40])
    with pytest.raises(ModelDirError, match="not a readable datastore"):
        load_datastore(corrupt, 64)
    config = DatastoreConfig(max_order=2, min_order=2, min_count=1)
    wide = tmp_path / "wide.safetensors"
    save_datastore(build_entries([[1, 2, 70, 3]], config), wide, 64, config, "test")
    with pytest.raises(ModelDirError, match=r"token ids outside \[0, 64\)"):
        load_datastore(wide, 64)
    old = tmp_path / "old.safetensors"  # whole continuations per n-gram, the first format
    save_file({"order2.keys": torch.tensor([[1, 2]], dtype=torch.int32),
               "order2.chains": torch.tensor([[3, 4]], dtype=torch.int32)}, str(old), metadata={"vocab_size": "64"})
    with pytest.raises(ModelDirError, match="no datastore metadata .* rebuild it with scripts.build_datastore"):
        load_datastore(old, 64)
    save_file({"order2.keys": torch.tensor([[1, 2]], dtype=torch.int32)}, str(old),
              metadata={"datastore": json.dumps({"vocab_size": 64})})
    with pytest.raises(ModelDirError, match="order-2 table has no next tokens"):
        load_datastore(old, 64)


@pytest.fixture(scope="module")
def small_model_with_datastore(tmp_path_factory):
    """A 64-token random target, a random drafter directory, and a datastore of the target's own
    greedy answers to a few prompts (so that it knows some of what the target writes)."""
    root = tmp_path_factory.mktemp("ds_model")
    model_dir = save_tiny_model(root / "model", "llama", vocab_size=64, seed=5)
    target_config = ModelConfig.from_dir(model_dir)
    drafter_config = DrafterConfig.for_target(target_config, default_feature_layers(target_config.num_hidden_layers),
                                              draft_vocab_size=64)
    drafter_dir = save_drafter(random_drafter(drafter_config, 128, seed=3), root / "drafter")
    plain = make_engine(model_dir, mode="plain", max_length=96, prefill_buckets=(16,))
    prompts = [[3 + i, 7, 11 + i] for i in range(6)]
    answers = plain.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    config = DatastoreConfig(max_order=3, min_order=2, min_count=1)
    sequences = [p + o.output_ids for p, o in zip(prompts, answers)]
    save_datastore(build_entries(sequences, config), drafter_dir / DATASTORE_FILE, 64, config, "test")
    return model_dir, drafter_dir


@pytest.mark.xla
def test_datastore_on_xla_compiles_once_equals_eager_and_plain(small_model_with_datastore):
    model_dir, drafter_dir = small_model_with_datastore
    # max_length=88 is used by no other test, so none of these graphs can be in torch-xla's cache.
    kwargs = dict(num_speculative_tokens=4, batch_size=2, max_length=88, prefill_buckets=(16,), lookup_ngram=2,
                  datastore=True)
    xla = make_engine(model_dir, drafter_dir, backend="xla", **kwargs)
    eager = make_engine(model_dir, drafter_dir, **kwargs)
    without = make_engine(model_dir, drafter_dir, **{**kwargs, "datastore": False})
    plain = make_engine(model_dir, mode="plain", max_length=88, prefill_buckets=(16,))
    prompts = [[4, 7, 12], [20, 21, 22, 23]]  # one the datastore was built from, one it was not
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    start = xla.backend.compile_count()
    got = xla.generate(prompts, params)
    assert xla.backend.compile_count() - start == 2  # the prefill and the step
    want = [o.output_ids for o in plain.generate(prompts, params)]
    assert [o.output_ids for o in got] == want
    with_store = eager.generate(prompts, params)
    assert [o.output_ids for o in with_store] == want
    assert [o.output_ids for o in without.generate(prompts, params)] == want


def test_the_datastore_drafts_the_answers_it_knows(small_model_with_datastore):
    """A table drafter right at about half the positions: the datastore knows the first prompt's answer,
    so behind it the drafts after a right first draft are right too, and more are accepted than
    without it; on the prompt it does not know, it changes nothing that matters."""
    from spec_helpers import fill_table, table_engine

    model_dir, drafter_dir = small_model_with_datastore
    prompts = [[4, 7, 12], [20, 21, 22, 23]]  # one the datastore was built from, one it was not
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    want = [o.output_ids for o in make_engine(model_dir, mode="plain", max_length=88,
                                              prefill_buckets=(16,)).generate(prompts, params)]
    acceptance = {}
    for store in (None, drafter_dir / DATASTORE_FILE):
        engine = table_engine(model_dir, 4, 2, max_length=88, buckets=(16,), lookup_ngram=2, datastore=store)
        fill_table(engine, prompts, want, wrong_fraction=0.5, seed=1)
        got = engine.generate(prompts, params)
        assert [o.output_ids for o in got] == want
        acceptance[store is not None] = [o.stats.acceptance_length for o in got]
    assert acceptance[True][0] > acceptance[False][0] + 0.5, acceptance


def test_datastore_needs_lookup_and_a_file(small_model_with_datastore, tiny_llama_dir):
    model_dir, drafter_dir = small_model_with_datastore
    shapes = dict(max_length=64, prefill_buckets=(16,))
    with pytest.raises(ConfigError, match="datastore needs context lookup"):
        make_engine(model_dir, drafter_dir, datastore=True, **shapes)
    with pytest.raises(ConfigError, match="drafter is random-init"):
        make_engine(tiny_llama_dir, lookup_ngram=2, datastore=True, **shapes)
    with pytest.raises(ConfigError, match="datastore must be True, False or 'auto'"):
        make_engine(model_dir, drafter_dir, lookup_ngram=2, datastore="yes", **shapes)
    assert make_engine(model_dir, drafter_dir, lookup_ngram=2, datastore="auto", **shapes).speculation.datastore
    assert not make_engine(tiny_llama_dir, lookup_ngram=2, datastore="auto", **shapes).speculation.datastore


def test_a_datastore_written_into_a_drafter_directory_is_recorded_and_verified(tmp_path):
    target_config = ModelConfig.from_dir(save_tiny_model(tmp_path / "model", "llama", vocab_size=64, seed=5))
    drafter_config = DrafterConfig.for_target(target_config, default_feature_layers(target_config.num_hidden_layers),
                                              draft_vocab_size=64)
    drafter_dir = save_drafter(random_drafter(drafter_config, 64, seed=3), tmp_path / "drafter")
    config = DatastoreConfig(max_order=2, min_order=2, min_count=1)
    path = drafter_dir / DATASTORE_FILE
    save_datastore(build_entries([[1, 2, 3, 4, 5]], config), path, 64, config, "test")
    record = json.loads((drafter_dir / CHECKSUMS_FILE).read_text())
    assert set(record) == {"config.json", "model.safetensors", DATASTORE_FILE}
    load_datastore(path, 64)
    save_drafter(random_drafter(drafter_config, 64, seed=4), drafter_dir)  # a new save keeps the datastore's entry
    assert json.loads((drafter_dir / CHECKSUMS_FILE).read_text())[DATASTORE_FILE] == record[DATASTORE_FILE]
    save_file({"order2.keys": torch.tensor([[1, 2]], dtype=torch.int32),
               "order2.next": torch.tensor([3], dtype=torch.int32)}, str(path),
              metadata={"datastore": json.dumps({"vocab_size": 64})})  # replaced by hand, not recorded
    with pytest.raises(WeightsError, match=rf"{DATASTORE_FILE} has sha256 .* modified or corrupted since it was saved"):
        load_datastore(path, 64)
    plain = tmp_path / "plain"  # a directory without a record gets none
    save_datastore(build_entries([[1, 2, 3]], config), plain / DATASTORE_FILE, 64, config, "test")
    assert sorted(p.name for p in plain.iterdir()) == [DATASTORE_FILE]
