"""Context lookup: drafts copied from earlier in the sequence, merged with a drafter's drafts.

When the last `ngram` committed tokens already occurred earlier in the sequence (prompt or output),
the tokens that followed that earlier occurrence are a cheap guess for what comes next: code repeats
the names of its signature, an answer repeats the numbers of its question. A small drafter copies
such spans badly (it must learn to match a token against the whole context), while the target copies
them almost surely. So `LookupProposer` wraps any proposer: at the positions a match can supply it
proposes the copied token, elsewhere the wrapped proposer's draft. The match is the most recent one
of the longest n-gram (up to `ngram`, down to 2) that occurred before. Where the committed tokens
match nothing, the n-gram ending in the wrapped proposer's first draft is looked up instead, for the
drafts after it: in the sequence, and failing that in an n-gram datastore of the target's answers to
other prompts (graphs/datastore_lookup.py), when the engine has one.

Because P-EAGLE's mask slots do not condition on the drafts before them, the drafter's guess for a
later position stays a valid guess whatever was copied before it. Every draft is still verified by
the target, so the output is unchanged (drafts are deterministic: a one-hot draft distribution, as
for the drafter's argmax drafts).

Graph code: fixed shapes only. The proposer keeps the sequence's tokens in a `[B, max_length + 1]`
buffer (the last column is a trash slot for padding writes) and compares every window of it with
the last n-gram: `ngram` comparisons of `[B, max_length]`, negligible next to a drafter pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuron_peagle.errors import ConfigError
from neuron_peagle.graphs.datastore_lookup import NgramDatastore
from neuron_peagle.graphs.proposers import Proposer
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.state_writes import StateModule


def context_lookup(history: Tensor, last_position: Tensor, ngram: int, num_speculative_tokens: int,
                   min_ngram: int | None = None) -> tuple[Tensor, Tensor]:
    """history [B, L] int64 (tokens at positions 0..last_position are the sequence), last_position [B]
    -> (tokens [B, K], found [B, K] bool): the K tokens after the most recent earlier occurrence of the
    n-gram ending at last_position, for the longest n from `ngram` down to `min_ngram` (default: `ngram`
    only) that occurred before; `found` is False where there is none or it runs past last_position."""
    tokens = found = None
    for n in range(min_ngram or ngram, ngram + 1):  # a longer match, where there is one, overrides
        n_tokens, n_found, matched = _lookup_one(history, last_position, n, num_speculative_tokens)
        if tokens is None:
            tokens, found = n_tokens, n_found
        else:
            tokens = torch.where(matched, n_tokens, tokens)
            found = torch.where(matched, n_found, found)
    return tokens, found


def _lookup_one(history: Tensor, last_position: Tensor, ngram: int, num_speculative_tokens: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """context_lookup for one n-gram size; also `matched` [B, 1]: an earlier occurrence exists."""
    batch, length = history.shape
    device = history.device
    last = last_position.unsqueeze(-1)  # [B, 1]
    query = history.gather(1, (last - ngram + 1 + torch.arange(ngram, device=device)).clamp(min=0))  # [B, n]
    windows = length - ngram + 1
    match = torch.ones(batch, windows, dtype=torch.bool, device=device)  # [B, W], window w ends at w + n - 1
    for i in range(ngram):
        match = match & (history[:, i:windows + i] == query[:, i:i + 1])
    ends = torch.arange(ngram - 1, length, device=device).unsqueeze(0)  # [1, W]
    match = match & (ends < last) & (last >= ngram - 1)
    best = torch.where(match, ends, torch.full_like(ends, -1)).max(dim=-1).values.unsqueeze(-1)  # [B, 1]
    follow = best + torch.arange(1, num_speculative_tokens + 1, device=device)  # [B, K]
    found = (best >= 0) & (follow <= last)
    return history.gather(1, follow.clamp(0, length - 1)), found, best >= 0


MIN_NGRAM = 2


class LookupProposer(StateModule):
    """`inner`'s drafts, replaced by context-lookup drafts wherever the last `ngram` tokens (or, failing
    that, the last ngram-1, ... down to 2) have an earlier occurrence that reaches that far.

    The lookup runs when tokens are committed (`commit`, at the end of prefill and of every step), not
    when drafting: its copies for the next step wait in `copied` ([B, K], -1 where nothing was found),
    and how many leading drafts they supply is known before that step runs (the K choice counts on copies). Both buffers
    are step-graph state, written through the `StateModule` methods."""

    def __init__(self, inner: Proposer, batch_size: int, max_length: int, num_speculative_tokens: int, ngram: int,
                 datastore: NgramDatastore | None = None) -> None:
        super().__init__()
        if ngram < 1:
            raise ConfigError(f"lookup_ngram must be >= 1 to look anything up, got {ngram}")
        self.inner = inner
        self.num_speculative_tokens = num_speculative_tokens  # the longest K any step drafts
        self.ngram = ngram
        # Where the last `ngram` tokens never occurred before, shorter n-grams down to bigrams are tried
        # (single tokens match too often by chance: on held-out prompts they lowered acceptance).
        self.min_ngram = min(MIN_NGRAM, ngram)
        self.max_length = max_length  # the trash column is history[:, max_length]
        self.datastore = datastore
        self.register_buffer("history", torch.zeros(batch_size, max_length + 1, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("copied", torch.full((batch_size, num_speculative_tokens), -1, dtype=torch.int64),
                             persistent=False)

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        # input_ids [B, bucket]: the prompt; the first new token arrives with the prefill's commit.
        self.inner.prefill(features, input_ids, lengths)
        self.write_slice("history", 1, 0, input_ids)

    def prefill_extent(self, name: str, bucket: int) -> tuple[int, int] | None:
        # The history past a prompt is written by the commits before any lookup reads it.
        return (1, bucket) if name == "history" else None

    def commit(self, state: SpecState) -> Tensor:  # -> [B] int64: leading drafts the lookup supplies
        positions, valid = state.pending_positions()  # [B, S]
        self.scatter("history", 1, torch.where(valid, positions, torch.full_like(positions, self.max_length)),
                     state.pending_tokens)
        copied, found = context_lookup(self.history[:, : self.max_length], state.last_position, self.ngram,
                                       self.num_speculative_tokens, self.min_ngram)
        self.assign("copied", torch.where(found, copied, torch.full_like(copied, -1)))
        # `found` is a prefix of the K positions (a match supplies the tokens up to last_position).
        return found.sum(dim=-1)

    def propose(self, state: SpecState, num_speculative_tokens: int) -> Tensor:  # -> drafts [B, K] (target ids)
        drafts = self.inner.propose(state, num_speculative_tokens)
        copied = self.copied[:, :num_speculative_tokens]
        drafts = torch.where(copied >= 0, copied, drafts)
        if num_speculative_tokens == 1:
            return drafts
        return torch.cat([drafts[:, :1], self._after_first_draft(state, drafts)], dim=1)

    def _after_first_draft(self, state: SpecState, drafts: Tensor) -> Tensor:  # drafts [B, K] -> [B, K-1]
        """Drafts 2..K where the committed tokens matched nothing: the n-gram that ends in the inner
        proposer's first draft may have occurred before (a copied span often starts with a token that
        no lookup predicts, a name or a number the drafter can guess), and then the tokens after it
        replace the inner proposer's later drafts; failing that, the datastore's continuation of it
        (the target's set phrases from other answers). Still fixed-shape: one more lookup, on a copy
        of the history with draft 1 written after the last committed token.

        The datastore serves only here, after the drafter's first draft: on held-out prompts, letting
        it replace the first draft too accepted less (the drafter's first draft is the better guess,
        its mask-slot drafts after it the worse)."""
        first = (state.last_position + 1).clamp(max=self.max_length - 1)  # [B]: draft 1's position
        history = self.history[:, : self.max_length].scatter(1, first.unsqueeze(-1), drafts[:, :1])
        copied, found = context_lookup(history, first, self.ngram, drafts.shape[1] - 1, self.min_ngram)
        if self.datastore is not None:
            stored, known = self.datastore.lookup(history, first, drafts.shape[1] - 1)
            here = found[:, :1]  # [B, 1]: this sequence's own match, where it has one, comes first
            copied, found = torch.where(here, copied, stored), torch.where(here, found, known)
        use = found & (self.copied[:, :1] < 0)  # [B, K-1]: rows whose committed tokens matched nothing
        return torch.where(use, copied, drafts[:, 1:])

