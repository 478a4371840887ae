"""Speculative decoding as two fixed-shape graphs: prefill (per bucket) and ONE step graph.

One step = draft (the proposer: one P-EAGLE drafter pass, or K sequential passes) + verify (one
target pass over [y, d_1..d_K]) + accept (greedy prefix rule or lossless rejection sampling), with
the target KV cache, the drafter KV cache and the pending-feature state all updated (in place, or by
rebinding for the nxd trace: neuron_peagle.state_writes).
Outputs are the committed tokens `[B, K+1]` padded with -1 and their count (1..K+1 per row).

Terms (as in the rejection-sampling literature): the draft tokens d_1..d_K are *accepted* while they
pass the test; at the first rejection the target supplies a *recovered* token; if all K pass it
supplies a *bonus* token from the position after d_K. Either way a step commits n + 1 tokens.

A graph is greedy or sampling by construction (`greedy=True` traces no softmax and ignores the
sampling inputs); the engine keeps one of each and uses the one a batch needs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from neuron_peagle.graphs.proposers import Proposer
from neuron_peagle.graphs.slots import SlotEntry
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.kernels import check_kernel_mode, lm_head_argmax
from neuron_peagle.kv_cache import KVCache, step_room
from neuron_peagle.models.target import TargetModel
from neuron_peagle.sampling import SamplingTensors, greedy_accept, next_tokens, rejection_accept, target_probs

# Given the name of a step part ("draft", "verify", "accept"), a context manager around it: a host-side
# timer (runtime.step_parts) on eager.
PartTimer = Callable[[str], AbstractContextManager]
Result = TypeVar("Result")


class SpecPrefillInputs(NamedTuple):
    input_ids: Tensor  # [1, bucket] int64, right-padded
    lengths: Tensor  # [1] int64
    slot: Tensor  # [1] int64, the batch row the sequence takes
    temperature: Tensor  # [1] float32 (0 = greedy)
    top_k: Tensor  # [1] int64
    top_p: Tensor  # [1] float32
    sample_uniform: Tensor  # [1, 1] float32, for the first token


class SpecStepInputs(NamedTuple):
    temperature: Tensor  # [B] float32
    top_k: Tensor  # [B] int64
    top_p: Tensor  # [B] float32
    accept_uniform: Tensor  # [B, K] float32
    sample_uniform: Tensor  # [B, K+1] float32


class SpecPrefillOutputs(NamedTuple):
    first_tokens: Tensor  # [1] int64
    known_drafts: Tensor  # [1] int64: leading drafts of the next step the proposer already knows


class SpecStepOutputs(NamedTuple):
    tokens: Tensor  # [B, K+1] int64, committed tokens padded with -1
    counts: Tensor  # [B] int64, 1..K+1
    known_drafts: Tensor  # [B] int64, as in SpecPrefillOutputs


class Verified(NamedTuple):
    """What the target's verify pass hands to acceptance."""

    features: Tensor  # [B, K+1, 3H] target features of y, d_1..d_K
    target_tokens: Tensor | None  # [B, K+1] the target's greedy tokens (greedy graphs)
    logits: Tensor | None  # [B, K+1, V] (sampling graphs)


class PrefillState(NamedTuple):
    """The state modules a one-sequence prefill runs on (graphs/slots.py): the batch's own at batch 1,
    else one-row twins built like them."""

    cache: KVCache
    proposer: Proposer
    state: SpecState


class SpecPrefillGraph(nn.Module):
    """One prompt bucket -> the target's and the proposer's state for slot `slot`, its first token."""

    Inputs = SpecPrefillInputs
    Outputs = SpecPrefillOutputs

    def __init__(self, target: TargetModel, proposer: Proposer, cache: KVCache, state: SpecState,
                 greedy: bool, prefill: PrefillState | None = None) -> None:
        super().__init__()
        self.target, self.proposer, self.cache, self.state = target, proposer, cache, state
        self.greedy = greedy
        prefill = prefill or PrefillState(cache, proposer, state)
        self.prefill_cache, self.prefill_proposer, self.prefill_state = prefill
        self.entry = SlotEntry(nn.ModuleList([cache, proposer, state]), nn.ModuleList(list(prefill)))

    def forward(self, input_ids: Tensor, lengths: Tensor, slot: Tensor, temperature: Tensor, top_k: Tensor,
                top_p: Tensor, sample_uniform: Tensor) -> SpecPrefillOutputs:
        batch, bucket = input_ids.shape
        positions = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        out = self.target(input_ids, positions, self.prefill_cache, (lengths - 1).unsqueeze(-1),
                          return_features=True, valid_lengths=lengths)
        first = next_tokens(out.logits, self.greedy, SamplingTensors(temperature, top_k, top_p), sample_uniform)
        self.prefill_proposer.prefill(out.features, input_ids, lengths)
        last = (lengths - 1).view(batch, 1, 1).expand(batch, 1, out.features.shape[-1])
        state = self.prefill_state
        features = state.pending_features
        slots = features.shape[1]
        # One pending pair, right-aligned: the last prompt position's features and the first new token.
        pending_features = torch.cat([features.new_zeros(batch, slots - 1, features.shape[-1]),
                                      out.features.gather(1, last)], dim=1)
        pending_tokens = torch.cat([torch.zeros(batch, slots - 1, dtype=first.dtype, device=first.device),
                                    first.unsqueeze(-1)], dim=1)
        state.hold(pending_features, pending_tokens, torch.ones_like(state.pending_count), lengths)
        known = self.prefill_proposer.commit(state)
        self.entry.enter(slot, bucket)
        return SpecPrefillOutputs(first, known)

    rows_per_step = None  # not a per-step graph

    @property
    def target_cache(self) -> KVCache:
        """The cache the target's pass reads (the one a backend may narrow)."""
        return self.prefill_cache

    def cache_extent(self, inputs: SpecPrefillInputs) -> int:
        """The last cache slot this call reads (host side, for a backend that narrows its reads)."""
        return inputs.input_ids.shape[1] - 1


class SpecStepGraph(nn.Module):
    """One speculative step drafting `num_speculative_tokens` (K) tokens. The state may be sized for a longer
    K (S = K_max + 1 pending slots): an engine that chooses K keeps a step graph per K on one state.

    K = 0 is plain decoding on the speculative state: no drafter pass, the target verifies y alone and
    commits its own token. The drafter has not seen the pending pairs then, so they are carried: the new
    pair joins them (up to S; an older one beyond that is dropped from the drafter's context), and the
    next step that drafts catches its cache up on all of them."""

    Inputs = SpecStepInputs
    Outputs = SpecStepOutputs

    def __init__(self, target: TargetModel, proposer: Proposer, cache: KVCache, state: SpecState,
                 num_speculative_tokens: int, greedy: bool, kernels: str = "reference",
                 lnc: int = 1) -> None:
        super().__init__()
        self.target, self.proposer, self.cache, self.state = target, proposer, cache, state
        self.num_speculative_tokens = num_speculative_tokens
        self.greedy = greedy
        # Greedy verify takes the target's argmax through `kernels.lm_head_argmax` in this mode.
        self.kernels = check_kernel_mode(kernels)
        self.lnc = lnc

    def forward(self, temperature: Tensor, top_k: Tensor, top_p: Tensor, accept_uniform: Tensor,
                sample_uniform: Tensor) -> SpecStepOutputs:
        return self.run_parts(SpecStepInputs(temperature, top_k, top_p, accept_uniform, sample_uniform))

    def run_parts(self, inputs: SpecStepInputs, timer: PartTimer | None = None) -> SpecStepOutputs:
        """The step, part by part: draft, verify, accept. With a `timer` (runtime.step_parts on eager)
        each part runs inside `timer(name)`; a compiled graph runs without one, and tracing takes the
        `timer is None` path only, so no Python timing enters the graph."""
        drafts = _in_part(timer, "draft", self.draft)
        verified = _in_part(timer, "verify", self.verify, drafts)
        return _in_part(timer, "accept", self.accept, drafts, verified, inputs)

    def draft(self) -> Tensor:  # -> drafts [B, K] (target ids)
        state = self.state
        # Rows past their end (finished, or padding of a short batch) must keep writes in range (for
        # the longest K the state serves, so that every step graph clamps alike).
        longest_k = state.pending_tokens.shape[1] - 1
        state.assign("last_position", state.last_position.clamp(max=self.cache.max_length - step_room(longest_k) - 1))
        if self.num_speculative_tokens == 0:
            return state.pending_tokens[:, :0]  # [B, 0]
        return self.proposer.propose(state, self.num_speculative_tokens)

    def verify(self, drafts: Tensor) -> Verified:  # drafts [B, K]
        k, state = self.num_speculative_tokens, self.state
        batch = drafts.shape[0]
        y = state.pending_tokens[:, -1:]
        verify_tokens = torch.cat([y, drafts], dim=1)  # [B, K+1]
        offsets = torch.arange(k + 1, device=drafts.device)
        verify_positions = state.last_position.unsqueeze(-1) + offsets
        rows = offsets.expand(batch, k + 1)
        if self.greedy:
            # Only the argmax per row is needed; with the NKI kernel the [B, K+1, vocab] logits never
            # reach HBM.
            out = self.target.normed_rows(verify_tokens, verify_positions, self.cache, rows, return_features=True)
            target_tokens, _ = lm_head_argmax(out.hidden, self.target.lm_head.weight, None, self.kernels,
                                                self.lnc)
            return Verified(out.features, target_tokens, None)
        out = self.target(verify_tokens, verify_positions, self.cache, rows, return_features=True)
        return Verified(out.features, None, out.logits)

    def accept(self, drafts: Tensor, verified: Verified, inputs: SpecStepInputs) -> SpecStepOutputs:
        state = self.state
        slots = state.pending_tokens.shape[1]
        sampling = SamplingTensors(inputs.temperature, inputs.top_k, inputs.top_p)
        features = verified.features
        if self.num_speculative_tokens == 0:
            # Plain decoding: the target's own token, picked as the decode graph picks it; the drafter did
            # not run, so its pending pairs are carried (class doc).
            token = (verified.target_tokens[:, 0] if self.greedy
                     else next_tokens(verified.logits, False, sampling, inputs.sample_uniform))
            tokens = token.unsqueeze(-1)  # [B, 1]
            state.hold(torch.cat([state.pending_features[:, 1:], features.to(state.pending_features.dtype)], 1),
                       torch.cat([state.pending_tokens[:, 1:], tokens], dim=1),
                       (state.pending_count + 1).clamp(max=slots), state.last_position + 1)
            return SpecStepOutputs(tokens, torch.ones_like(token), self.proposer.commit(state))
        if self.greedy:
            tokens, counts = greedy_accept(drafts, verified.target_tokens)
        else:
            tokens, counts = rejection_accept(drafts, target_probs(verified.logits, sampling), inputs.accept_uniform,
                                              inputs.sample_uniform)
        # The verified positions 0..n (y and the accepted drafts) have exact target features; pair
        # each with the token committed after it, right-aligned in the S slots, for the next step.
        source = (torch.arange(slots, device=drafts.device) - (slots - counts).unsqueeze(-1)).clamp(min=0)  # [B, S]
        state.hold(features.gather(1, source.unsqueeze(-1).expand(-1, -1, features.shape[-1])),
                   tokens.gather(1, source), counts, state.last_position + counts)
        known = self.proposer.commit(state)
        return SpecStepOutputs(tokens, counts, known)

    @property
    def rows_per_step(self) -> int:
        """Rows a decode-time matmul multiplies: the verify's K+1 tokens per sequence (the drafts are as
        many or fewer)."""
        return self.cache.shape[0] * (self.num_speculative_tokens + 1)

    @property
    def target_cache(self) -> KVCache:
        return self.cache

    def cache_extent(self, inputs: SpecStepInputs) -> int:
        """The last cache slot this call reads (host side, for a backend that narrows its reads): the
        verify's last position, from the last committed one clamped as `draft` clamps it."""
        longest_k = self.state.pending_tokens.shape[1] - 1
        last = self.state.last_position.clamp(max=self.cache.max_length - step_room(longest_k) - 1)
        return int(last.max()) + self.num_speculative_tokens


def _in_part(timer: PartTimer | None, name: str, part: Callable[..., Result], *args) -> Result:
    if timer is None:
        return part(*args)
    with timer(name):
        return part(*args)
