"""The target's training responses, kept in the repository so that they outlive a machine.

Generating responses is the dearest part of training on a CPU (about an hour for a few thousand), and
the work directory that holds them stays on the machine that wrote them. The archive keeps only token
ids (a few MB, gzip JSON lines, one example per line, sorted so the file is reproducible); features
are recomputed from it, which costs a target forward per example instead of a decode.

`merge_archive` adds the archive's examples to a work directory's responses file (the data stage
then answers only the prompts neither holds), `write_archive` stores the union back.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

from neuron_peagle.errors import ModelDirError
from neuron_peagle.files import atomic_path
from neuron_peagle.training.data import Example, append_examples, read_examples

DOMAINS = ("code", "math", "chat")


def read_archive(path: Path, vocab_size: int) -> list[Example]:
    """Every example of the archive at `path`, checked: known domain, ids in [0, vocab_size)."""
    if not path.is_file():
        raise FileNotFoundError(f"no training-response archive at {path}")
    examples = []
    try:
        with gzip.open(path, "rt") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                example = Example.from_record(json.loads(line))
                ids = example.ids
                if example.domain not in DOMAINS or not example.prompt_ids or example.sample < 0 or not all(
                        isinstance(i, int) and 0 <= i < vocab_size for i in ids):
                    raise ModelDirError(f"{path}, line {number}: not an example of a target with "
                                        f"{vocab_size} tokens (domain {example.domain!r}, ids out of range, "
                                        "no prompt or a negative sample)")
                examples.append(example)
    except (OSError, EOFError, KeyError, TypeError, ValueError) as error:  # ValueError: bad JSON too
        raise ModelDirError(f"{path} is not a readable training-response archive: {error}") from error
    return examples


def write_archive(examples: Sequence[Example], path: Path) -> int:
    """Store `examples` (one per distinct answer: prompt and `sample`) sorted by domain, prompt and
    sample; returns how many."""
    unique: dict[tuple[int, ...], Example] = {}
    for example in examples:
        unique.setdefault(example.key, example)
    ordered = sorted(unique.values(), key=lambda e: (DOMAINS.index(e.domain), e.prompt_ids, e.sample))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:  # a crash mid-write leaves the old archive whole
        with open(partial, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle:
            for example in ordered:
                handle.write((json.dumps(example.record(), separators=(",", ":")) + "\n").encode())
    return len(ordered)


def merge_archive(archive: Path, responses: Path, vocab_size: int) -> int:
    """Append to `responses` the archive's answers it does not hold; returns how many."""
    held = {e.key for e in read_examples(responses)}
    new = [e for e in read_archive(archive, vocab_size) if e.key not in held]
    append_examples(responses, new)
    return len(new)
