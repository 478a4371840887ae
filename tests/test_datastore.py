"""The n-gram datastore: built as counted, looked up in fixed shapes as a dict would be, refused when
it does not fit the target, and lossless inside speculative decoding on eager and xla."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_tiny_model
from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.datastore import (DATASTORE_FILE, DatastoreConfig, build_entries, hash_table, load_datastore,
                                     save_datastore)
from neuron_peagle.errors import ConfigError, ModelDirError
from neuron_peagle.graphs.datastore import EMPTY, NgramDatastore
from neuron_peagle.models.drafter_io import save_drafter
from neuron_peagle.models.target import default_feature_layers
from neuron_peagle.runtime.drafter_choice import random_drafter
from neuron_peagle.runtime.engine import Engine, SamplingParams


def test_entries_keep_frequent_ngrams_and_chain_their_most_frequent_continuations():
    sequences = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4]]
    entries = build_entries(sequences, DatastoreConfig(max_order=2, min_order=2, chain_length=3, min_count=2))
    keys, chains = entries[2]
    # (2, 3) seen 4 times (then 4 three times, 5 once), (1, 2) 3 times; (9, 2) once: left out; (3, 4)
    # ends every answer, so no chain leaves it.
    assert keys.tolist() == [[2, 3], [1, 2]]
    assert chains.tolist() == [[4, EMPTY, EMPTY], [3, 4, EMPTY]]


def test_longer_ngrams_override_shorter_ones_in_the_chain():
    sequences = [[7, 1, 2, 5]] * 2 + [[8, 1, 2, 6]] * 3
    entries = build_entries(sequences, DatastoreConfig(max_order=3, min_order=2, chain_length=2, min_count=2))
    chains = {tuple(k): c for k, c in zip(entries[3][0].tolist(), entries[3][1].tolist())}
    assert chains[(7, 1, 2)] == [5, EMPTY]  # the 3-gram knows better than the bigram (1, 2) -> 6
    bigram_chains = {tuple(k): c for k, c in zip(entries[2][0].tolist(), entries[2][1].tolist())}
    assert bigram_chains[(1, 2)] == [6, EMPTY]


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3), st.integers(1, 40))
def test_hash_table_lookup_equals_a_dict(data, order, count):
    keys = data.draw(st.lists(st.tuples(*[st.integers(0, 300)] * order), min_size=count, max_size=count, unique=True))
    chains = [data.draw(st.lists(st.integers(0, 300), min_size=3, max_size=3)) for _ in keys]
    table = hash_table(torch.tensor(keys).reshape(len(keys), order), torch.tensor(chains))
    stored = {tuple(k) for k in table.slot_keys.tolist() if k[0] != EMPTY}
    assert len(stored) >= 0.9 * len(keys)  # at most a few entries dropped by full probe windows
    absent = data.draw(st.lists(st.tuples(*[st.integers(0, 300)] * order), min_size=1, max_size=10))
    queries = keys + [a for a in absent if a not in keys]
    got = table.lookup(torch.tensor(queries).reshape(len(queries), order)).tolist()
    want = dict(zip(keys, chains))
    for query, chain in zip(queries, got):
        assert chain == (want[query] if query in stored else [EMPTY] * 3)


def test_datastore_lookup_takes_the_longest_known_ngram_and_pads_past_its_chains():
    store = NgramDatastore([hash_table(torch.tensor([[2, 3]]), torch.tensor([[10, 11]])),
                            hash_table(torch.tensor([[1, 2, 3]]), torch.tensor([[20, 21]]))])
    history = torch.tensor([[1, 2, 3, 0], [5, 2, 3, 0], [2, 3, 0, 0], [3, 0, 0, 0]])
    tokens, found = store.lookup(history, torch.tensor([2, 2, 1, 0]), 3)
    assert tokens.tolist() == [[20, 21, EMPTY], [10, 11, EMPTY], [10, 11, EMPTY], [EMPTY] * 3]
    assert found.tolist() == [[True, True, False], [True, True, False], [True, True, False], [False] * 3]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("datastore") / DATASTORE_FILE
    config = DatastoreConfig(max_order=2, min_order=2, chain_length=4, min_count=1)
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
    config = DatastoreConfig(max_order=2, min_order=2, chain_length=2, min_count=1)
    wide = tmp_path / "wide.safetensors"
    save_datastore(build_entries([[1, 2, 70, 3]], config), wide, 64, config, "test")
    with pytest.raises(ModelDirError, match=r"token ids outside \[0, 64\)"):
        load_datastore(wide, 64)


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
    plain = Engine.from_pretrained(model_dir, mode="plain", max_length=96, prefill_buckets=(16,))
    prompts = [[3 + i, 7, 11 + i] for i in range(6)]
    answers = plain.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    config = DatastoreConfig(max_order=3, min_order=2, chain_length=6, min_count=1)
    sequences = [p + o.output_ids for p, o in zip(prompts, answers)]
    save_datastore(build_entries(sequences, config), drafter_dir / DATASTORE_FILE, 64, config, "test")
    return model_dir, drafter_dir


def test_datastore_on_xla_compiles_once_equals_eager_and_plain(small_model_with_datastore):
    model_dir, drafter_dir = small_model_with_datastore
    # max_length=88 is used by no other test, so none of these graphs can be in torch-xla's cache.
    kwargs = dict(num_speculative_tokens=4, batch_size=2, max_length=88, prefill_buckets=(16,), lookup_ngram=2,
                  datastore=True)
    xla = Engine.from_pretrained(model_dir, drafter_dir, backend="xla", **kwargs)
    eager = Engine.from_pretrained(model_dir, drafter_dir, **kwargs)
    without = Engine.from_pretrained(model_dir, drafter_dir, **{**kwargs, "datastore": False})
    plain = Engine.from_pretrained(model_dir, mode="plain", max_length=88, prefill_buckets=(16,))
    prompts = [[4, 7, 12], [20, 21, 22, 23]]  # one the datastore was built from, one it was not
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    start = xla.backend.compile_count()
    got = xla.generate(prompts, params)
    assert xla.backend.compile_count() - start == 2  # the prefill and the step
    want = [o.output_ids for o in plain.generate(prompts, params)]
    assert [o.output_ids for o in got] == want
    with_store = eager.generate(prompts, params)
    assert [o.output_ids for o in with_store] == want
    # The datastore knows the first answer, so it drafts more of it than the random drafter does.
    assert with_store[0].stats.acceptance_length > without.generate(prompts[:1], params)[0].stats.acceptance_length


def test_datastore_needs_lookup_and_a_file(small_model_with_datastore, tiny_llama_dir):
    model_dir, drafter_dir = small_model_with_datastore
    shapes = dict(max_length=64, prefill_buckets=(16,))
    with pytest.raises(ConfigError, match="datastore needs context lookup"):
        Engine.from_pretrained(model_dir, drafter_dir, datastore=True, **shapes)
    with pytest.raises(ConfigError, match="drafter is random-init"):
        Engine.from_pretrained(tiny_llama_dir, lookup_ngram=2, datastore=True, **shapes)
    with pytest.raises(ConfigError, match="datastore must be True, False or 'auto'"):
        Engine.from_pretrained(model_dir, drafter_dir, lookup_ngram=2, datastore="yes", **shapes)
    assert Engine.from_pretrained(model_dir, drafter_dir, lookup_ngram=2, datastore="auto", **shapes).build.datastore
    assert not Engine.from_pretrained(tiny_llama_dir, lookup_ngram=2, datastore="auto", **shapes).build.datastore
