"""Build, save and load the n-gram datastore (host side; the lookup is graphs/datastore.py).

The datastore is made from the target's own answers (the drafter's training responses): for every
n-gram of orders `min_order..max_order` seen at least `min_count` times, the most frequent chain of
`chain_length` tokens after it, where each next token is the most frequent one after the longest
known n-gram ending before it (the chain stops where nothing is known). Saved as safetensors
(`order<n>.keys` [E, n], `order<n>.chains` [E, C], int32, EMPTY-padded, entries in descending count)
with the vocabulary size in its metadata; loaded into hash tables sized for a load factor of at most
one half.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from neuron_peagle.errors import ConfigError, ModelDirError
from neuron_peagle.graphs.datastore import EMPTY, MAX_VOCAB, PROBES, NgramDatastore, NgramTable, ngram_hash

DATASTORE_FILE = "datastore.safetensors"


@dataclass(frozen=True)
class DatastoreConfig:
    max_order: int = 3
    min_order: int = 2
    chain_length: int = 8
    min_count: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_order <= self.max_order <= 8:
            raise ConfigError(f"datastore orders must satisfy 1 <= min_order <= max_order <= 8, got "
                              f"{self.min_order}..{self.max_order}")
        if self.chain_length < 1 or self.min_count < 1:
            raise ConfigError("datastore chain_length and min_count must be >= 1")


def build_entries(sequences: Iterable[Sequence[int]], config: DatastoreConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """order -> (keys [E, n], chains [E, C]) int32, entries in descending count."""
    orders = range(config.min_order, config.max_order + 1)
    counts: dict[int, defaultdict[tuple[int, ...], Counter]] = {n: defaultdict(Counter) for n in orders}
    for sequence in sequences:
        for n in orders:
            table = counts[n]
            for p in range(n, len(sequence)):
                table[tuple(sequence[p - n:p])][sequence[p]] += 1
    best = {n: {key: (nexts.most_common(1)[0][0], sum(nexts.values())) for key, nexts in table.items()}
            for n, table in counts.items()}

    def next_token(context: list[int]) -> int | None:
        for n in reversed(orders):
            found = best[n].get(tuple(context[-n:])) if len(context) >= n else None
            if found is not None and found[1] >= config.min_count:
                return found[0]
        return None

    entries = {}
    for n in orders:
        kept = sorted(((total, key) for key, (_, total) in best[n].items() if total >= config.min_count),
                      key=lambda item: (-item[0], item[1]))
        keys = torch.tensor([key for _, key in kept], dtype=torch.int32).reshape(len(kept), n)
        chains = torch.full((len(kept), config.chain_length), EMPTY, dtype=torch.int32)
        for row, (_, key) in enumerate(kept):
            context = list(key)
            for column in range(config.chain_length):
                token = next_token(context)
                if token is None:
                    break
                chains[row, column] = token
                context.append(token)
        entries[n] = (keys, chains)
    return entries


def read_response_sequences(path: Path, context_tokens: int) -> list[list[int]]:
    """The responses of a JSON-lines file (gzip or plain) of {"prompt_ids", "response_ids"} records,
    each with the last `context_tokens` prompt tokens before it (the n-grams that start an answer)."""
    if not path.is_file():
        raise FileNotFoundError(f"no responses file at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    sequences = []
    with opener(path, "rt") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, response = list(record["prompt_ids"]), list(record["response_ids"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ModelDirError(f"{path}, line {number}: not a response record ({err})") from None
            sequences.append(prompt[-context_tokens:] + response)
    return sequences


def save_datastore(entries: dict[int, tuple[torch.Tensor, torch.Tensor]], path: Path, vocab_size: int,
                   config: DatastoreConfig, source: str) -> None:
    tensors = {}
    for n, (keys, chains) in entries.items():
        tensors[f"order{n}.keys"] = keys.contiguous()
        tensors[f"order{n}.chains"] = chains.contiguous()
    metadata = {"vocab_size": str(vocab_size), "chain_length": str(config.chain_length),
                "min_count": str(config.min_count), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_datastore(path: Path, vocab_size: int) -> NgramDatastore:
    """The datastore at `path` as hash tables, checked against the target's vocabulary size."""
    if not path.is_file():
        raise ModelDirError(f"no n-gram datastore at {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"{path}: not a readable datastore ({err})") from None
    stored_vocab = int(metadata.get("vocab_size", -1))
    if stored_vocab != vocab_size:
        raise ConfigError(f"{path} was built for a vocabulary of {stored_vocab} tokens; the target has {vocab_size}")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"the n-gram datastore supports vocabularies up to {MAX_VOCAB} tokens, got {vocab_size}")
    orders = sorted(int(name[len("order"):].split(".")[0]) for name in tensors if name.endswith(".keys"))
    if not orders:
        raise ModelDirError(f"{path}: no n-gram tables in it")
    tables = []
    for n in orders:
        keys, chains = tensors.get(f"order{n}.keys"), tensors.get(f"order{n}.chains")
        if chains is None or keys.dim() != 2 or keys.shape[1] != n or chains.shape[0] != keys.shape[0]:
            raise ModelDirError(f"{path}: order-{n} table has mismatched shapes")
        if keys.numel() and not (0 <= int(keys.min()) and int(keys.max()) < vocab_size
                                 and int(chains.min()) >= EMPTY and int(chains.max()) < vocab_size):
            raise ModelDirError(f"{path}: order-{n} table holds token ids outside [0, {vocab_size})")
        tables.append(hash_table(keys.long(), chains.long()))
    return NgramDatastore(tables)


def hash_table(keys: torch.Tensor, chains: torch.Tensor) -> NgramTable:
    """keys [E, n], chains [E, C] (in priority order) -> an NgramTable of a power-of-2 number of slots,
    at least twice E; an entry whose PROBES slots are all taken by earlier entries is dropped."""
    slots = 1 << max(4, (2 * max(1, keys.shape[0]) - 1).bit_length())
    slot_keys = torch.full((slots, keys.shape[1]), EMPTY, dtype=torch.int64)
    slot_chains = torch.full((slots, chains.shape[1]), EMPTY, dtype=torch.int64)
    owner = [-1] * slots
    for entry, first in enumerate(ngram_hash(keys, slots).tolist()):
        for probe in range(PROBES):
            slot = (first + probe) & (slots - 1)
            if owner[slot] < 0:
                owner[slot] = entry
                break
    placed = torch.tensor([(slot, entry) for slot, entry in enumerate(owner) if entry >= 0], dtype=torch.int64)
    if placed.numel():
        slot_keys[placed[:, 0]] = keys[placed[:, 1]]
        slot_chains[placed[:, 0]] = chains[placed[:, 1]]
    return NgramTable(slot_keys, slot_chains)
