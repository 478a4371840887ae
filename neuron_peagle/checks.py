"""Value checks shared by the API's dataclasses and the command lines: types, ranges, finiteness and
encodings, each failing with a ConfigError that names the field (the command lines name their option
instead: neuron_peagle.cli_args).

Integers must be integers: a float or a bool where a count is meant is refused, never rounded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

from neuron_peagle.errors import ConfigError, PromptError


def integer(field: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum]; floats (even 2.0), bools and text are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{field} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{field} must be <= {maximum}, got {value}")
    return value


def flag(field: str, value: Any) -> bool:
    """`value` as a bool: only True or False ("no", 0 and None are refused, not taken for what they look like)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be True or False, got {value!r}")
    return value


def real(field: str, value: Any, minimum: float | None = None, maximum: float | None = None,
         above: float | None = None) -> float:
    """`value` as a finite float in range (`above`: strictly greater than); NaN and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{field} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(f"{field} must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{field} must be <= {maximum}, got {value}")
    return value


def choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate: undecodable bytes of an argument, or a
    half pair from JSON), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"it is not valid UTF-8 (character {err.start + 1} is {text[err.start]!r})"
    return None


def prompt_text(number: int, text: Any) -> str:
    """Prompt `number` (counted from 1, as every message counts prompts) as checked text."""
    if not isinstance(text, str):
        raise PromptError(f"prompt {number} is {_kind(text)}; expected text or a list of token ids")
    problem = utf8_problem(text)
    if problem:
        raise PromptError(f"prompt {number}: {problem}")
    return text


def token_ids(number: int, ids: Any) -> list[int]:
    """Prompt `number` given as token ids: a sequence of ints (not floats, not bools)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise PromptError(f"prompt {number} is {_kind(ids)}; expected text or a list of token ids")
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise PromptError(f"prompt {number}: token {position} is {token!r}, not an integer token id")
    return [int(t) for t in ids]


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"


def dataclass_from_dict(cls, data: dict[str, Any], what: str):
    """`cls(**data)` for a dataclass, refusing keys that are none of its fields (naming them)."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(sorted(unknown))}")
    return cls(**data)
