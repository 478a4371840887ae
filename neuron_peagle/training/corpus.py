"""Written text as extra training data: sequences the target reads but did not write.

Regenerating responses costs one target decode step per token; reading a text costs one prefill, a
few times cheaper per token on a CPU. The drafter's loss is KL to the target's own distribution at
every position, so a text the target only reads still teaches what the target would predict there.
Two kinds of text are available on every machine that runs the project:

- `reference`: the reference answers of the training prompt sets (MBPP code, GSM8K and MATH-500
  solutions), as the assistant's turn after the prompt in the chat template;
- `stdlib`: chunks of the Python standard library's own modules (code, docstrings, comments), as the
  assistant's turn after a request for that module.

Held-out prompts are never used: the reference answers are those of the training slices only.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from neuron_peagle.training.data import Example
from neuron_peagle.training.prompt_sets import FILES, _jsonl_gz, fetch_prompt_sets

CORPUS_KINDS = ("reference", "stdlib")


@dataclass(frozen=True)
class Document:
    domain: str
    request: str  # the user's turn
    text: str  # the assistant's turn


def reference_documents(root: Path | None = None) -> list[Document]:
    """Reference answers of the training slices (GSM8K questions 0..999, all of MBPP and MATH-500)."""
    root = root or fetch_prompt_sets()
    docs = [Document("code", r["doc"]["text"].strip(), r["doc"]["code"].replace("\r\n", "\n").strip())
            for r in _jsonl_gz(root / FILES["mbpp"])]
    docs += [Document("math", r["doc"]["question"].strip(), r["doc"]["answer"].strip())
             for r in _jsonl_gz(root / FILES["gsm8k"])[:1000]]
    docs += [Document("math", r["doc"]["problem"].strip(), r["doc"]["solution"].strip())
             for r in _jsonl_gz(root / FILES["math500"])]
    return docs


def stdlib_documents(lines_per_chunk: int = 40, seed: int = 0, library: Path | None = None) -> list[Document]:
    """The standard library's top-level and package modules (tests excluded) in chunks of lines,
    shuffled with a fixed seed."""
    library = library or Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    docs = []
    for path in sorted(library.rglob("*.py")):
        parts = path.relative_to(library).parts
        if skip.intersection(parts):
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        module = ".".join(parts)[: -len(".py")]
        for first in range(0, len(lines), lines_per_chunk):
            chunk = "\n".join(lines[first:first + lines_per_chunk]).strip()
            if len(chunk) >= 200:
                docs.append(Document("code", f"Show lines {first + 1}-{first + lines_per_chunk} of the "
                                             f"Python module {module}.", chunk))
    random.Random(seed).shuffle(docs)
    return docs


def corpus_examples(kinds: Sequence[str], encode_request: Callable[[str], list[int]],
                    encode_text: Callable[[str], list[int]], end_ids: Sequence[int], max_tokens: int,
                    max_sequence: int) -> list[Example]:
    """Examples of the chosen kinds, in order, until `max_tokens` response tokens; each sequence is cut
    to `max_sequence` tokens (request included)."""
    unknown = sorted(set(kinds) - set(CORPUS_KINDS))
    if unknown:
        raise ValueError(f"unknown corpus kinds {unknown}; known: {list(CORPUS_KINDS)}")
    documents: list[Document] = []
    for kind in kinds:
        documents += reference_documents() if kind == "reference" else stdlib_documents()
    out, total = [], 0
    for doc in documents:
        if total >= max_tokens:
            break
        prompt = encode_request(doc.request)
        response = (encode_text(doc.text) + list(end_ids))[: max(0, max_sequence - len(prompt))]
        if len(response) < 8:
            continue
        out.append(Example(doc.domain, prompt, response))
        total += len(response)
    return out
