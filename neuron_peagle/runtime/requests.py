"""The checks every request passes before any work starts, as functions of the settings alone
(`RequestLimits`), so the command line can run them before a model is loaded: `check_requests` returns
the prompts as `CheckedPrompts`, which an engine with the same limits takes as they are, instead of
checking them a second time.

Prompts are counted from 1 in every message, by the API and the command line alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuron_peagle import checks
from neuron_peagle.config import BuildConfig
from neuron_peagle.errors import ConfigError, PromptError
from neuron_peagle.kv_cache import step_room


def prompt_inputs(prompts: Any) -> list[str | list[int]]:
    """The API's `prompts` argument as a list: one text, texts, or token-id lists (tensors allowed),
    each checked for its type (text must be valid UTF-8; ids must be integers)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if hasattr(prompts, "tolist") and not isinstance(prompts, list):  # a tensor or array of ids
        prompts = prompts.tolist()
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be text, a list of texts or a list of token-id lists, got {prompts!r:.60}")
    checked: list[str | list[int]] = []
    for number, prompt in enumerate(prompts, start=1):
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            checked.append(checks.prompt_text(number, prompt))
        else:
            checked.append(checks.token_ids(number, prompt))
    return checked


def check_prompt(number: int, prompt_ids: Sequence[int], max_new_tokens: int, build: BuildConfig,
                 num_speculative_tokens: int, vocab_size: int) -> None:
    """Prompt `number` fits the built shapes: not empty, within the largest prefill bucket, with room
    for max_new_tokens (and a speculative step's K+1 slots) in the cache, ids in the vocabulary."""
    largest = build.prefill_buckets[-1]
    if len(prompt_ids) == 0:
        raise PromptError(f"prompt {number} is empty")
    if len(prompt_ids) > largest:
        raise PromptError(
            f"prompt {number} has {len(prompt_ids)} tokens, more than the largest prefill bucket "
            f"({largest}); build with a larger bucket or shorten the prompt"
        )
    # A speculative step writes K+1 cache entries past the last committed token, and the
    # drafter keeps one trash slot at the end of its cache.
    room = build.max_length - step_room(num_speculative_tokens)
    if len(prompt_ids) + max_new_tokens > room:
        extra = (f" (less {num_speculative_tokens + 1} slots that speculative steps need)"
                 if num_speculative_tokens else "")
        raise PromptError(
            f"prompt {number}: {len(prompt_ids)} prompt tokens + max_new_tokens "
            f"{max_new_tokens} exceed max_length {build.max_length}{extra}"
        )
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise PromptError(f"prompt {number} has token ids outside the vocabulary [0, {vocab_size})")


def check_stop_token_ids(stop_token_ids: Sequence[int] | None, vocab_size: int) -> None:
    outside = [t for t in stop_token_ids or () if t >= vocab_size]
    if outside:
        raise ConfigError(f"stop_token_ids {outside} are outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit: the built shapes, K, and the target's vocabulary."""

    build: BuildConfig
    num_speculative_tokens: int
    vocab_size: int


class CheckedPrompts(list):
    """Token-id prompts that passed `check_requests` under `limits`, each for its own `max_new_tokens` and
    `stop_token_ids`."""

    def __init__(self, prompts: Sequence[Sequence[int]], limits: RequestLimits, max_new_tokens: Sequence[int],
                 stop_token_ids: Sequence[Sequence[int] | None]) -> None:
        super().__init__(list(p) for p in prompts)
        self.limits, self.max_new_tokens, self.stop_token_ids = limits, tuple(max_new_tokens), tuple(stop_token_ids)

    def checked_for(self, limits: RequestLimits, max_new_tokens: Sequence[int],
                    stop_token_ids: Sequence[Sequence[int] | None]) -> bool:
        return (self.limits, self.max_new_tokens, self.stop_token_ids) == (limits, tuple(max_new_tokens),
                                                                           tuple(stop_token_ids))


def check_requests(prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                   stop_token_ids: Sequence[Sequence[int] | None], limits: RequestLimits) -> CheckedPrompts:
    """Every prompt (token ids, counted from 1), with its own max_new_tokens and stop tokens, fits `limits`;
    the prompts, marked checked."""
    for number, (prompt_ids, new_tokens, stops) in enumerate(zip(prompts, max_new_tokens, stop_token_ids), start=1):
        check_prompt(number, prompt_ids, new_tokens, limits.build, limits.num_speculative_tokens, limits.vocab_size)
        check_stop_token_ids(stops, limits.vocab_size)
    return CheckedPrompts(prompts, limits, max_new_tokens, stop_token_ids)
