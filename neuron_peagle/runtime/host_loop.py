"""The host loop: keeps the batch's slots busy, commits the tokens each graph step produces, slot by
slot, and decides when each request stops.

It knows nothing of tokenisation or of how a step makes its tokens: a `Runner` admits one request
into a free slot (a one-sequence prefill: graphs/slots.py) and then, each step, returns the tokens it
committed per slot (`[batch, tokens_per_step]`, padded with -1) and their count. Slots accept
different numbers of tokens per step. A request leaves its slot the moment it is finished, and the
next waiting request (in input order) enters it before the next step: continuous batching on
fixed-shape graphs. A free slot keeps stepping (its tokens are ignored).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from neuron_peagle.runtime.k_choice import KChoice
from neuron_peagle.runtime.stats import RequestStats


class Runner(Protocol):
    batch_size: int
    num_speculative_tokens: int  # the longest K a step drafts; 0 for plain decoding
    timings: dict[str, float]  # seconds per step part ("draft", "verify", "accept"), accumulated
    last_choice: KChoice | None  # how the last step's K was chosen (None: nothing to choose)

    def calibrate(self) -> None:
        """Measure what choosing K needs (step times), before any slot holds a request."""

    def admit(self, slot: int, prompt: Sequence[int], params: Any) -> int:
        """Prefill `prompt` into free slot `slot` with its SamplingParams; returns its first new token."""

    def step(self) -> tuple[Tensor, Tensor]:
        """One step for every slot: (tokens [B, K+1] padded with -1, counts [B] in 1..K+1)."""

    def retire(self, slot: int) -> None:
        """Slot `slot` is free: its tokens are ignored from now on (it stops steering the steps)."""


@dataclass(frozen=True)
class Request:
    """One request as the host loop runs it (already validated)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    stop_token_ids: set[int]
    params: Any  # its SamplingParams: temperature, top_k, top_p, seed


@dataclass
class RowState:
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    done: bool = False


# Called with (request index, newly committed tokens); returns True to stop that request.
CommitCallback = Callable[[int, list[int]], bool]


@dataclass(frozen=True)
class StepRecord:
    """One decode step, as the host loop saw it (for profiler sessions and monitoring)."""

    step: int  # index of the step in the run
    num_speculative_tokens: int  # K of the step graph that ran (chosen per step; 0 for plain decoding)
    counts: list[int]  # tokens the step's graph committed per slot (accepted + 1); 0 for free slots
    kept: list[int]  # of those, the tokens the request kept (fewer where it stopped: a stop token, max_new_tokens)
    wall_s: float  # host wall time of the step, graph call included
    parts_s: dict[str, float]  # draft / verify / accept seconds inside the graph (eager backend only)
    # per slot, the request whose tokens the step committed (None: free, or, with overlap, a request that
    # ended in the step before: its tokens from this step are discarded)
    requests: list[int | None] = field(default_factory=list)
    choice: dict | None = None  # how K was chosen (runtime.k_choice.KChoice.to_dict), where it was


StepCallback = Callable[[StepRecord], None]
# Called once per request when it is finished, with its index and final state.
FinishCallback = Callable[[int, "RowState"], None]


def run_requests(runner: Runner, requests: Sequence[Request], on_commit: CommitCallback | None = None,
                 on_step: StepCallback | None = None, on_finish: FinishCallback | None = None,
                 refill: bool = True, overlap: bool = False) -> list[RowState]:
    """Generate for every request, `runner.batch_size` at a time, refilling slots as they free up;
    `on_finish` hears of each request the moment it is finished. Each prefill and step is named
    `peagle::prefill` / `peagle::step` for a profiler. `refill=False` runs fixed groups instead (the
    next requests enter only once every slot is free): the baseline continuous batching is measured
    against (scripts/bench_slots.py).

    `overlap=True` takes the host's reading off the critical path: while step n+1 runs, a reader
    thread commits step n's tokens, checks stops and calls the callbacks. The next step's inputs live in
    the graphs' state, so nothing waits for the host; the price is one step of lag: a request that
    finished in step n still holds its slot in step n+1, whose tokens for it are discarded, and its slot
    is refilled before step n+2. The steps themselves stay on the calling thread (a second thread of
    torch work would start a second OpenMP team on the same cores: 2.4x slower steps, measured), and a
    prefill waits for the read before it (callbacks never run on two threads at once). Every request's
    tokens are the same as without overlap (tests/test_host_overlap.py)."""
    rows = [RowState(list(r.prompt_ids), r.max_new_tokens) for r in requests]
    for row in rows:
        row.stats.num_prompt_tokens = len(row.prompt_ids)
        row.stats.num_speculative_tokens = runner.num_speculative_tokens
    runner.calibrate()
    waiting = deque(range(len(requests)))
    slots: list[int | None] = [None] * runner.batch_size
    loop = _Loop(runner, requests, rows, slots, on_commit, on_step, on_finish)
    reader = ThreadPoolExecutor(1, thread_name_prefix="peagle-read") if overlap else None
    reading: Future | None = None  # the read of the last step (overlap only)
    last_ends = False  # every request the step being read holds reaches its length in it

    def read_done() -> None:
        """Wait for the read under way; its finished requests leave their slots (on this thread)."""
        nonlocal reading, last_ends
        if reading is not None:
            done, reading = reading, None
            done.result()
        loop.retire_finished()
        last_ends = False

    try:
        while True:
            free = [slot for slot, index in enumerate(slots) if index is None]
            if waiting and (free if refill else len(free) == len(slots)):
                read_done()  # a prefill's callbacks never run beside a read's; the read may free more slots
            for slot in range(runner.batch_size if refill or all(i is None for i in slots) else 0):
                while slots[slot] is None and waiting:
                    index = waiting.popleft()
                    if _admit(runner, slot, index, requests[index], rows[index], on_commit, on_finish):
                        slots[slot] = index
            if all(index is None for index in slots) or last_ends:
                if reading is None and all(index is None for index in slots) and not waiting:
                    return rows
                read_done()  # nothing left to step until the last step is read
                continue
            done = loop.run_step(list(slots))  # on this thread, while the reader reads the step before
            read_done()
            if reader is None:
                loop.read(done)
                loop.retire_finished()
            else:
                last_ends = loop.all_end_in(done)  # before the read starts changing the rows
                reading = reader.submit(loop.read, done)
    finally:
        if reader is not None:
            reader.shutdown(wait=True)  # an error or Ctrl-C: the read under way ends first


@dataclass
class _Done:
    """A step as it came back from the runner, with what the host needs to read it later."""

    step: int
    held: list[int | None]  # per slot, the request it held when the step ran
    tokens: Tensor
    counts: Tensor
    elapsed: float
    spent: dict[str, float]
    choice: KChoice | None


class _Loop:
    """The host's side of the steps: running one, and reading one (commit, stops, callbacks, records)."""

    def __init__(self, runner: Runner, requests: Sequence[Request], rows: list[RowState], slots: list[int | None],
                 on_commit: CommitCallback | None, on_step: StepCallback | None,
                 on_finish: FinishCallback | None) -> None:
        self.runner, self.requests, self.rows, self.slots = runner, requests, rows, slots
        self.on_commit, self.on_step, self.on_finish = on_commit, on_step, on_finish
        self.steps = 0
        self._to_retire: list[tuple[int, int]] = []

    def run_step(self, held: list[int | None]) -> _Done:
        runner = self.runner
        before = dict(runner.timings)
        start = time.perf_counter()
        with torch.profiler.record_function("peagle::step"):
            tokens, counts = runner.step()
        elapsed = time.perf_counter() - start
        spent = {name: runner.timings.get(name, 0.0) - before.get(name, 0.0) for name in runner.timings}
        done = _Done(self.steps, held, tokens, counts, elapsed, spent, runner.last_choice)
        self.steps += 1
        return done

    def read(self, done: _Done) -> None:
        """Commit a step's tokens to the requests it held that are still running; those it finished leave
        their slots in `retire_finished`, on the loop's thread."""
        held = [index if index is not None and not self.rows[index].done else None for index in done.held]
        live_counts = [0 if index is None else int(done.counts[slot]) for slot, index in enumerate(held)]
        kept = [0] * len(held)
        for slot, index in enumerate(held):
            if index is None:
                continue
            row = self.rows[index]
            stats = row.stats
            stats.decode_time_s += done.elapsed
            stats.draft_time_s += done.spent.get("draft", 0.0)
            stats.verify_time_s += done.spent.get("verify", 0.0)
            stats.accept_time_s += done.spent.get("accept", 0.0)
            stats.record_step(live_counts[slot])
            committed = done.tokens[slot, : live_counts[slot]].tolist()
            kept[slot] = _commit(row, index, committed, self.requests[index].stop_token_ids, self.on_commit)
            stats.num_decoded_tokens += kept[slot]
            if row.done:
                self._to_retire.append((slot, index))
        if self.on_step is not None:
            choice = done.choice
            self.on_step(StepRecord(done.step, done.tokens.shape[1] - 1, live_counts, kept, done.elapsed, done.spent,
                                    held, choice.to_dict() if choice is not None else None))

    def all_end_in(self, done: _Done) -> bool:
        """Whether every request `done` held reaches its max_new_tokens in it (a step commits at least one
        token per row): then a step after it would only be discarded."""
        live = [index for index in done.held if index is not None and not self.rows[index].done]
        return all(self.rows[i].max_new_tokens - len(self.rows[i].output_ids) <= 1 for i in live)

    def retire_finished(self) -> None:
        """The requests the last read finished leave their slots (the runner hears of it between steps)."""
        for slot, index in self._to_retire:
            self.slots[slot] = None
            _finish(self.runner, slot, index, self.rows[index], self.on_finish)
        self._to_retire.clear()


def _admit(runner: Runner, slot: int, index: int, request: Request, row: RowState,
           on_commit: CommitCallback | None, on_finish: FinishCallback | None) -> bool:
    """Prefill request `index` into `slot` and commit its first token; False if that already ended it."""
    start = time.perf_counter()
    with torch.profiler.record_function("peagle::prefill"):
        first = runner.admit(slot, row.prompt_ids, request.params)
    row.stats.prefill_time_s = time.perf_counter() - start
    _commit(row, index, [first], request.stop_token_ids, on_commit)
    if row.done:
        _finish(runner, slot, index, row, on_finish)
    return not row.done


def _finish(runner: Runner, slot: int, index: int, row: RowState, on_finish: FinishCallback | None) -> None:
    runner.retire(slot)
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
