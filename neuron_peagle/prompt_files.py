"""Prompts files: JSON lines, one `{"prompt": "..."}` object per line (other fields are ignored), from a
file or standard input (`-`). Every line is checked before any prompt runs, and an error names the
file, the line and the prompt's number (prompts are counted from 1, blank lines skipped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neuron_peagle import checks
from neuron_peagle.errors import PromptError

STDIN = "-"


def read_prompts_file(path: Path | str) -> list[str]:
    if str(path) == STDIN:
        name, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        name, raw = str(path), Path(path).read_bytes()
    prompts: list[str] = []
    for line_number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
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
        prompts.append(record["prompt"])
    if not prompts:
        raise PromptError(f"{name} holds no prompt")
    return prompts
