"""Prompts files: JSON lines, one `{"prompt": "..."}` object per line, from a regular file or standard input
(`-`), read line by line (a line is at most MAX_LINE_BYTES). A line may carry its request's own sampling
settings (`REQUEST_FIELDS`: max_new_tokens, temperature, top_k, top_p, seed, stop), which replace the
command line's for that prompt; other fields are ignored. Every line is checked before any prompt runs, and
an error names the file, the line and the prompt's number (prompts are counted from 1, blank lines
skipped); the settings' values are checked where they become a request's SamplingParams (the command line),
with the same names."""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from neuron_peagle import checks
from neuron_peagle.errors import PromptError

STDIN = "-"
MAX_LINE_BYTES = 16 << 20  # far beyond any prompt a prefill bucket holds
REQUEST_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


@dataclass(frozen=True)
class PromptLine:
    prompt: str
    where: str  # "file:line (prompt N)", for messages
    options: dict = field(default_factory=dict)  # the line's REQUEST_FIELDS, as the JSON gave them


def _lines(handle: BinaryIO, name: str) -> Iterator[bytes]:
    """The file's lines without their ends (and without a UTF-8 byte-order mark), one at a time."""
    for line_number in range(1, sys.maxsize):
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            raise PromptError(f"{name}:{line_number}: longer than {MAX_LINE_BYTES >> 20} MiB: not a prompts file")
        if line_number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        yield line.rstrip(b"\n").removesuffix(b"\r")


def read_prompts_file(path: Path | str) -> list[str]:
    """The prompts of a prompts file (its lines' own settings left out)."""
    return [line.prompt for line in read_prompt_lines(path)]


def read_prompt_lines(path: Path | str) -> list[PromptLine]:
    """Every prompt of a prompts file with its line's own sampling settings."""
    if str(path) == STDIN:
        return _read(sys.stdin.buffer, "<stdin>")
    name = str(path)
    try:
        mode = Path(path).stat().st_mode
    except OSError as err:
        raise PromptError(f"{name}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise PromptError(f"{name} is not a regular file: give a prompts file, or - for standard input")
    with open(path, "rb") as handle:
        return _read(handle, name)


def _read(handle: BinaryIO, name: str) -> list[PromptLine]:
    prompts: list[PromptLine] = []
    for line_number, line in enumerate(_lines(handle, name), start=1):
        where = f"{name}:{line_number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptError(f"{where}: not valid UTF-8 (byte {line[err.start]:#04x} at column {err.start + 1}); "
                              "save the file as UTF-8") from None
        if not text.strip():
            continue
        number = len(prompts) + 1
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            raise PromptError(f'{where}: not JSON; expected an object like {{"prompt": "..."}}') from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise PromptError(f'{where}: expected a JSON object with a "prompt" field')
        if not isinstance(record["prompt"], str):
            raise PromptError(f'{where} (prompt {number}): "prompt" is {json.dumps(record["prompt"])[:40]}, '
                              "not text")
        problem = checks.utf8_problem(record["prompt"])
        if problem:
            raise PromptError(f"{where} (prompt {number}): {problem}")
        options = {key: record[key] for key in REQUEST_FIELDS if key in record}
        prompts.append(PromptLine(record["prompt"], f"{where} (prompt {number})", options))
    if not prompts:
        raise PromptError(f"{name} holds no prompt")
    return prompts
