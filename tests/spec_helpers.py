"""Engines with a table proposer: an oracle (the target's own continuation) or a corrupted one."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch
from torch import Tensor, nn

from neuron_peagle.backends import get_backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.engine import Engine
from neuron_peagle.runtime.spec_runner import SpecRunner
from neuron_peagle.speculation import SpeculationConfig
from neuron_peagle.tokenizer import load_tokenizer


class TableProposer(nn.Module):
    """Proposes tokens read from a table of known continuations: `table[b, p]` is the draft for
    position p. Filled with the target's own greedy output it is an oracle (everything accepted);
    with some entries corrupted, a drafter that is right some of the time. For tests of the
    verify/accept path, independent of any drafter's quality."""

    def __init__(self, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(batch_size, max_length, dtype=torch.int64), persistent=False)

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        pass

    def propose(self, state: SpecState, num_speculative_tokens: int) -> Tensor:  # -> drafts [B, K] (target ids)
        offsets = torch.arange(1, num_speculative_tokens + 1, device=state.last_position.device)
        index = (state.last_position.unsqueeze(-1) + offsets).clamp(max=self.table.shape[1] - 1)
        return self.table.gather(1, index)

    def commit(self, state: SpecState) -> Tensor:  # -> [B] int64: drafts known in advance (none)
        return torch.zeros_like(state.pending_count)


def table_engine(model_dir: Path, k: int, batch_size: int, max_length: int = 256,
                 buckets: tuple[int, ...] = (64, 128), backend: str = "eager", lookup_ngram: int = 0,
                 datastore: Path | None = None, dtype: str = "float32") -> Engine:
    """An engine whose drafts come from a table (`fill_table`); with `lookup_ngram`, behind context
    lookup, and with `datastore` (a datastore file) behind the n-gram datastore too."""
    build = BuildConfig(batch_size=batch_size, max_length=max_length, prefill_buckets=buckets, backend=backend,
                        dtype=dtype)
    target = TargetModel.from_pretrained(model_dir, max_length, build.torch_dtype)
    store = None
    if lookup_ngram and datastore is not None:
        from neuron_peagle.datastore import load_datastore

        store = load_datastore(datastore, target.config.vocab_size)

    def make_proposer(rows: int):
        proposer = TableProposer(rows, max_length)
        if lookup_ngram:
            from neuron_peagle.graphs.lookup import LookupProposer

            proposer = LookupProposer(proposer, rows, max_length, k, lookup_ngram, store)
        return proposer

    runner = SpecRunner(target, make_proposer, build, get_backend(backend), (k,))
    speculation = SpeculationConfig(num_speculative_tokens=k, **{**DRAFTER_ALONE, "lookup_ngram": lookup_ngram,
                                                                 "datastore": datastore is not None})
    return Engine(Path(model_dir), target, load_tokenizer(model_dir), build, runner, speculation)


def fill_table(engine: Engine, prompts: list[list[int]], continuations: list[list[int]],
               wrong_fraction: float = 0.0, seed: int = 0) -> None:
    """table[b, p] = the reference token at position p; a `wrong_fraction` of entries corrupted."""
    proposer = engine.runner.proposer
    proposer = getattr(proposer, "inner", proposer)  # the table behind context lookup
    table = torch.zeros_like(proposer.table, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
        sequence = torch.tensor(prompt + cont)
        table[row, : len(sequence)] = sequence
    wrong = torch.rand(table.shape, generator=generator) < wrong_fraction
    table = torch.where(wrong, (table + 1) % engine.target.config.vocab_size, table)
    proposer.table.copy_(table.to(proposer.table.device))


def record_ks(engine: Engine) -> list[int]:
    """The K of every step `engine` runs from now on (chosen per step: runtime/k_choice.py)."""
    used: list[int] = []
    step = engine.runner.step

    def recording():
        tokens, counts = step()
        used.append(tokens.shape[1] - 1)
        return tokens, counts

    engine.runner.step = recording
    return used


def cycle_ks(engine: Engine, ks: list[int]) -> None:
    """Make `engine`'s steps run the K of `ks` in turn, whatever the cost model would choose."""
    from neuron_peagle.runtime.k_choice import KChoice

    chooser = engine.runner.chooser
    turn = itertools.cycle(ks)
    chooser.choose = lambda known: KChoice(next(turn), len(known), {}, {})
    chooser.chooses = True
    chooser.step_seconds.update({k: 1.0 for k in chooser.ks})  # nothing to calibrate


def set_step_seconds(engine: Engine, seconds: dict[int, float]) -> None:
    """Step times for `engine`'s K choice, as if measured (no calibration runs then)."""
    engine.runner.chooser.step_seconds.update(seconds)


SPECULATION_FIELDS = {f.name for f in dataclasses.fields(SpeculationConfig)}
# What these tests were written against: the drafter alone (no context lookup, no datastore, every step K).
DRAFTER_ALONE = {"lookup_ngram": 0, "datastore": False, "short_draft_tokens": 0, "plain_step": False}


def make_engine(model_dir=None, drafter_dir=None, **options) -> Engine:
    """`Engine.from_pretrained` with the speculation settings given flat, the tests' shorthand: the
    SpeculationConfig fields among `options` (unset ones: DRAFTER_ALONE, K and mode at their defaults)
    go into `speculation`, the rest are the build's."""
    fields = {name: options.pop(name) for name in list(options) if name in SPECULATION_FIELDS}
    return Engine.from_pretrained(model_dir, drafter_dir, SpeculationConfig(**{**DRAFTER_ALONE, **fields}), **options)


def nxd_plan(engine: Engine) -> list:
    """`engine`'s planned graphs as the nxd backend prepares them: every graph holding every state module
    (backends.nxd_graphs.hold_every_state)."""
    from neuron_peagle.backends.nxd_graphs import hold_every_state
    from neuron_peagle.graphs.interface import plan

    hold_every_state(list({id(s.module): s.module for s in plan(engine.runner)}.values()))
    return plan(engine.runner)
