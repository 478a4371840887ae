"""Build, save and load the n-gram datastore (host side; the lookup is graphs/datastore_lookup.py).

The datastore is made from the target's own answers (the drafter's training responses): for every
n-gram of orders `min_order..max_order` seen at least `min_count` times, the token seen most often
after it (the lookup chains them into drafts). Saved as safetensors (`order<n>.keys` [E, n],
`order<n>.next` [E], int32, entries in descending count) with one metadata entry, `datastore`: a
JSON object holding the vocabulary size (one key, so the same build writes the same bytes);
loaded into one hash table of every order, sized for a load factor of at most one half. In a drafter
directory with a checksums.json, saving records the file's sha256 there and loading verifies it.
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

from neuron_peagle.checksums import read_checksums, record_checksums, verify_checksums
from neuron_peagle.errors import ConfigError, ModelDirError
from neuron_peagle.files import atomic_path
from neuron_peagle.graphs.datastore_lookup import EMPTY, MAX_VOCAB, PAD, PROBES, NgramDatastore, NgramTable, ngram_hash

DATASTORE_FILE = "datastore.safetensors"


@dataclass(frozen=True)
class DatastoreConfig:
    max_order: int = 3
    min_order: int = 2
    min_count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_order <= self.max_order <= 8:
            raise ConfigError(f"datastore orders must satisfy 1 <= min_order <= max_order <= 8, got "
                              f"{self.min_order}..{self.max_order}")
        if self.min_count < 1:
            raise ConfigError(f"datastore min_count must be >= 1, got {self.min_count}")


def build_entries(sequences: Iterable[Sequence[int]], config: DatastoreConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """order -> (keys [E, n], next tokens [E]) int32, entries in descending count (ties: by key)."""
    entries = {}
    for n in range(config.min_order, config.max_order + 1):
        counts: defaultdict[tuple[int, ...], Counter] = defaultdict(Counter)
        for sequence in sequences:
            for p in range(n, len(sequence)):
                counts[tuple(sequence[p - n:p])][sequence[p]] += 1
        totals = ((sum(nexts.values()), key, nexts) for key, nexts in counts.items())
        kept = sorted(((total, key, nexts.most_common(1)[0][0]) for total, key, nexts in totals
                       if total >= config.min_count), key=lambda item: (-item[0], item[1]))
        keys = torch.tensor([key for _, key, _ in kept], dtype=torch.int32).reshape(len(kept), n)
        entries[n] = (keys, torch.tensor([token for _, _, token in kept], dtype=torch.int32))
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
    """Write the datastore to `path`, whole or not at all; where its directory has a checksums.json
    (a drafter directory), its sha256 is recorded there too."""
    tensors = {}
    for n, (keys, next_tokens) in entries.items():
        tensors[f"order{n}.keys"] = keys.contiguous()
        tensors[f"order{n}.next"] = next_tokens.contiguous()
    about = {"vocab_size": vocab_size, "min_count": config.min_count, "orders": sorted(entries), "source": source}
    metadata = {"datastore": json.dumps(about, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = read_checksums(path.parent)  # a corrupt record is refused before anything is written
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    if recorded is not None:  # a drafter directory save_drafter wrote: its record now vouches for this file too
        record_checksums(path.parent, (path.name,), create=False)


def load_datastore(path: Path, vocab_size: int) -> NgramDatastore:
    """The datastore at `path` as a hash table, checked against the target's vocabulary size (and against
    its sha256 where its directory's checksums.json records one)."""
    if not path.is_file():
        raise ModelDirError(f"no n-gram datastore at {path}")
    verify_checksums(path.parent, names=(path.name,))
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"{path}: not a readable datastore ({err})") from None
    if "datastore" not in metadata:
        raise ModelDirError(f"{path}: no datastore metadata (an older datastore format? rebuild it with "
                            "scripts.build_datastore)")
    stored_vocab = int(json.loads(metadata["datastore"]).get("vocab_size", -1))
    if stored_vocab != vocab_size:
        raise ConfigError(f"{path} was built for a vocabulary of {stored_vocab} tokens; the target has {vocab_size}")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"the n-gram datastore supports vocabularies up to {MAX_VOCAB} tokens, got {vocab_size}")
    orders = sorted(int(name[len("order"):].split(".")[0]) for name in tensors if name.endswith(".keys"))
    if not orders:
        raise ModelDirError(f"{path}: no n-gram tables in it")
    checked = {}
    for n in orders:
        keys, next_tokens = tensors[f"order{n}.keys"], tensors.get(f"order{n}.next")
        if next_tokens is None:
            raise ModelDirError(f"{path}: order-{n} table has no next tokens (an older datastore format? "
                                "rebuild it with scripts.build_datastore)")
        if keys.dim() != 2 or keys.shape[1] != n or next_tokens.shape != keys.shape[:1]:
            raise ModelDirError(f"{path}: order-{n} table has mismatched shapes")
        if keys.numel() and not (0 <= int(keys.min()) and int(keys.max()) < vocab_size
                                 and 0 <= int(next_tokens.min()) and int(next_tokens.max()) < vocab_size):
            raise ModelDirError(f"{path}: order-{n} table holds token ids outside [0, {vocab_size})")
        checked[n] = (keys, next_tokens)
    return datastore_from_entries(checked)


def datastore_from_entries(entries: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> NgramDatastore:
    """order -> (keys [E, n], next tokens [E]) -> one hash table of every order, keys left-padded
    with PAD to the longest order (shorter orders placed first: they serve most often)."""
    width = max(entries)
    ordered = sorted(entries.items())
    keys = [torch.cat([torch.full((k.shape[0], width - n), PAD, dtype=torch.int64), k.long()], dim=1)
            for n, (k, _) in ordered]
    next_tokens = [t.long() for _, (_, t) in ordered]
    return NgramDatastore(hash_table(torch.cat(keys), torch.cat(next_tokens)), tuple(entries))


def hash_table(keys: torch.Tensor, next_tokens: torch.Tensor) -> NgramTable:
    """keys [E, n], next_tokens [E] (in priority order) -> an NgramTable of a power-of-2 number of
    slots, at least twice E; an entry whose PROBES slots are all taken by earlier entries is dropped."""
    slots = 1 << max(4, (2 * max(1, keys.shape[0]) - 1).bit_length())
    slot_keys = torch.full((slots, keys.shape[1]), EMPTY, dtype=torch.int64)
    slot_next = torch.full((slots,), EMPTY, dtype=torch.int64)
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
        slot_next[placed[:, 0]] = next_tokens[placed[:, 1]]
    return NgramTable(slot_keys, slot_next)
