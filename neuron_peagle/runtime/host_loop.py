"""The host loop: commits the tokens each graph step produces, row by row, and decides when to stop.

It knows nothing of tokenisation or of how a step makes its tokens: a `Runner` prefills a batch and
then, each step, returns the tokens it committed per row (`[batch, max_tokens_per_step]`, padded with
-1) and their count. Rows accept different numbers of tokens per step; a finished row (or a padding
row of an incomplete batch) keeps its place in the fixed-shape batch but is frozen by the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from neuron_peagle.runtime.batch import BatchSampling
from neuron_peagle.runtime.stats import RequestStats


class Runner(Protocol):
    batch_size: int
    tokens_per_step: int  # M: 1 for plain decoding, K+1 for speculative
    timings: dict[str, float]  # seconds per step part ("draft", "verify", "accept"), this batch

    def prefill(self, prompts: Sequence[Sequence[int]], sampling: BatchSampling) -> Tensor:
        """Fill the caches for up to batch_size prompts; returns the first new token per row, [B]."""

    def step(self) -> tuple[Tensor, Tensor]:
        """One step for every row: (tokens [B, M] padded with -1, counts [B] in 1..M)."""

    def retire(self, row: int) -> None:
        """Row `row` is done: its tokens are ignored from now on (it may stop steering the steps)."""


@dataclass
class RowState:
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    done: bool = False


# Called with (row index in the batch, newly committed tokens); returns True to stop that row.
CommitCallback = Callable[[int, list[int]], bool]


@dataclass(frozen=True)
class StepRecord:
    """One decode step of one batch, as the host loop saw it (for profiler sessions and monitoring)."""

    step: int  # index of the step in its batch's decode loop
    num_speculative_tokens: int  # K of the step graph that ran (adaptive K varies it; 0 for plain decoding)
    counts: list[int]  # tokens the step's graph committed per row (accepted + 1); 0 for rows already finished
    kept: list[int]  # of those, the tokens the row kept (fewer where it stopped: a stop token, max_new_tokens)
    wall_s: float  # host wall time of the step, graph call included
    parts_s: dict[str, float]  # draft / verify / accept seconds inside the graph (eager backend only)


StepCallback = Callable[[StepRecord], None]
# Called once per row when it is finished, with its final state.
FinishCallback = Callable[[int, "RowState"], None]


def run_batch(runner: Runner, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
              stop_token_ids: Sequence[set[int]], sampling: BatchSampling,
              on_commit: CommitCallback | None = None, on_step: StepCallback | None = None,
              on_finish: FinishCallback | None = None) -> list[RowState]:
    """Generate for one batch of at most `runner.batch_size` prompts (already validated), each with its own
    max_new_tokens and stop tokens; `on_finish` hears of each row the moment it is finished.
    The prefill and every step are named `peagle::prefill` / `peagle::step` for a profiler."""
    rows = [RowState(list(p), n) for p, n in zip(prompts, max_new_tokens)]
    for row in rows:
        row.stats.num_prompt_tokens = len(row.prompt_ids)
        row.stats.num_speculative_tokens = runner.tokens_per_step - 1

    start = time.perf_counter()
    with torch.profiler.record_function("peagle::prefill"):
        first = runner.prefill([r.prompt_ids for r in rows], sampling)
    prefill_time = time.perf_counter() - start
    for i, row in enumerate(rows):
        row.stats.prefill_time_s = prefill_time
        _commit(row, i, [int(first[i])], stop_token_ids[i], on_commit)
        if row.done:
            _finish(runner, row, i, on_finish)

    step = 0
    while not all(row.done for row in rows):
        before = dict(runner.timings)
        start = time.perf_counter()
        with torch.profiler.record_function("peagle::step"):
            tokens, counts = runner.step()
        elapsed = time.perf_counter() - start
        spent = {name: runner.timings.get(name, 0.0) - before.get(name, 0.0) for name in runner.timings}
        live_counts = [0 if row.done else int(counts[i]) for i, row in enumerate(rows)]
        kept = [0] * len(rows)
        for i, row in enumerate(rows):
            if row.done:
                continue
            stats = row.stats
            stats.decode_time_s += elapsed
            stats.draft_time_s += spent.get("draft", 0.0)
            stats.verify_time_s += spent.get("verify", 0.0)
            stats.accept_time_s += spent.get("accept", 0.0)
            stats.record_step(int(counts[i]))
            committed = tokens[i, : int(counts[i])].tolist()
            kept[i] = _commit(row, i, committed, stop_token_ids[i], on_commit)
            stats.num_decoded_tokens += kept[i]
            if row.done:
                _finish(runner, row, i, on_finish)
        if on_step is not None:
            on_step(StepRecord(step, tokens.shape[1] - 1, live_counts, kept, elapsed, spent))
        step += 1
    return rows


def _finish(runner: Runner, row: RowState, index: int, on_finish: FinishCallback | None) -> None:
    runner.retire(index)
    if on_finish is not None:
        on_finish(index, row)


def _commit(row: RowState, index: int, tokens: list[int], stop_token_ids: set[int],
            on_commit: CommitCallback | None) -> int:
    """Append tokens up to a stop token or the length limit; returns how many were kept."""
    kept = []
    for token in tokens:
        kept.append(token)
        if token in stop_token_ids:
            row.stats.finish_reason = "stop"
            break
        if len(row.output_ids) + len(kept) >= row.max_new_tokens:
            row.stats.finish_reason = "length"
            break
    row.output_ids.extend(kept)
    if row.stats.finish_reason:
        row.done = True
    if on_commit is not None and kept and on_commit(index, kept) and not row.done:
        row.stats.finish_reason = "stop"
        row.done = True
    row.stats.num_new_tokens = len(row.output_ids)
    return len(kept)
