"""Draft proposers: the part of a speculative step that guesses the next K tokens.

A proposer is an `nn.Module` (its buffers, such as a drafter's KV cache, are step-graph state) with
the three methods of `Proposer`. All of them read the same `SpecState` (graphs/spec_state.py), sized
for the longest K the engine drafts (`S = K + 1` slots). A proposer drafts `num_speculative_tokens` tokens
per call (`propose(state, k)`, any k <= S-1: an engine that chooses K per step runs step graphs of several
lengths on the same state). After each commit, `commit(state)` says how many leading drafts of the
next step it already knows (context lookup's copies; 0 for a drafter alone): that count picks the
next step's K. The proposers: `DrafterProposer` (here) and `LookupProposer` (graphs/lookup.py),
which wraps another proposer and consults the n-gram datastore (graphs/datastore_lookup.py).

A drafter slot at position p pairs (feature f_p, token t_{p+1}); so the pending pairs sit at drafter
positions last_position - pending_count .. last_position - 1, and the last one predicts draft 1.
Slots that hold nothing (left padding of the pending block, padding of a prompt bucket) write to the
drafter cache's last slot, a trash slot that no query ever reads.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.kernels import check_kernel_mode, draft_input, lm_head_argmax
from neuron_peagle.models.drafter import Drafter, pick_rows
from neuron_peagle.models.target import TargetModel


class Proposer(Protocol):
    """What the step graphs (graphs/speculative.py) call on a proposer. B = batch rows, T = prompt
    bucket, K = draft tokens of this step (<= S-1), H = target hidden size."""

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        # features [B, T, 3H] (the target's prefill pass), input_ids [B, T] right-padded, lengths [B]:
        # the prompt, before the first commit.
        ...

    def propose(self, state: SpecState, num_speculative_tokens: int) -> Tensor:  # -> drafts [B, K] (target ids)
        ...

    def commit(self, state: SpecState) -> Tensor:  # -> [B] int64: leading drafts of the next step it knows
        # After prefill's first token and after every step, with the newly committed tokens in `state`.
        ...


class DrafterProposer(nn.Module):
    """P-EAGLE parallel drafting (one drafter pass) or EAGLE-style sequential drafting (K passes).

    Layer 0's input and the greedy drafts go through `kernels.draft_input` / `kernels.lm_head_argmax`,
    in the kernel mode `kernels` (see neuron_peagle.kernels; "reference" is plain PyTorch).
    """

    def __init__(self, drafter: Drafter, target: TargetModel, batch_size: int, parallel: bool,
                 kernels: str = "reference", lnc: int = 1) -> None:
        super().__init__()
        self.drafter = drafter
        self.target_embedding = target.embed_tokens
        self.cache = drafter.new_cache(batch_size)
        self.parallel = parallel
        self.kernels = check_kernel_mode(kernels)
        self.lnc = lnc  # the kernels' launch: physical NeuronCores per logical core (BuildConfig.lnc)
        self.trash = drafter.max_length - 1
        # Every mask slot's hidden is fc(mask_hidden) (after the input norms, where the drafter has them):
        # computed once here, not in every step graph (a proposer serves the drafter's weights as they
        # are when it is built).
        with torch.no_grad():
            fc_mask_row = drafter.project_features(drafter.mask_hidden.to(drafter.fc.weight.dtype))
        self.register_buffer("fc_mask_row", fc_mask_row, persistent=False)

    def _first_layer_input(self, tokens: Tensor, features: Tensor, is_mask: Tensor) -> tuple[Tensor, Tensor]:
        # tokens, is_mask [B, S]; features [B, S, 3H] -> layer 0's input [B, S, 2H], residual [B, S, H]
        d = self.drafter
        embeds = d.token_embeddings(tokens, self.target_embedding)
        features = d.normalize_features(features)  # norm_before_fc / fc_norm; as they are otherwise
        return draft_input(embeds, features, is_mask, d.draft_input_params(self.fc_mask_row), self.kernels,
                           self.lnc)

    def _greedy(self, h: Tensor) -> Tensor:  # pre-norm hidden [B, R, H] -> drafts [B, R] (target ids)
        d = self.drafter
        drafts, _ = lm_head_argmax(d.norm(h), d.lm_head.weight, d.d2t, self.kernels, self.lnc)
        return drafts

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        # features [B, T, 3H], input_ids [B, T], lengths [B]: pairs (f_i, t_{i+1}) for i <= n-2.
        # The last prompt pair (f_{n-1}, first new token) stays pending for the first step.
        batch, bucket = input_ids.shape
        slot = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        valid = slot <= (lengths - 2).unsqueeze(-1)
        next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        x, residual = self._first_layer_input(next_tokens, features, torch.zeros_like(valid))
        positions = torch.where(valid, slot, torch.full_like(slot, self.trash))
        self.drafter.run_layers(x, residual, positions, self.cache)

    def _real_slots(self, state: SpecState) -> tuple[Tensor, Tensor]:
        token_positions, valid = state.pending_positions()  # [B, S]
        positions = token_positions - 1  # a pair sits at its feature's position, one before its token
        return torch.where(valid, positions, torch.full_like(positions, self.trash)), valid

    def propose(self, state: SpecState, num_speculative_tokens: int) -> Tensor:  # -> drafts [B, K] (target ids)
        if self.parallel:
            return self._propose_parallel(state, num_speculative_tokens)
        return self._propose_sequential(state, num_speculative_tokens)

    def commit(self, state: SpecState) -> Tensor:  # -> [B] int64: drafts known in advance (none)
        return torch.zeros_like(state.pending_count)

    def _propose_parallel(self, state: SpecState, k: int) -> Tensor:
        d = self.drafter
        batch, slots = state.pending_tokens.shape
        device = state.pending_tokens.device
        real_positions, _ = self._real_slots(state)
        mask_positions = state.last_position.unsqueeze(-1) + torch.arange(k - 1, device=device)  # [B, K-1]
        positions = torch.cat([real_positions, mask_positions], dim=1)  # [B, S+K-1]
        is_mask = torch.cat([torch.zeros(batch, slots, dtype=torch.bool, device=device),
                             torch.ones(batch, k - 1, dtype=torch.bool, device=device)], dim=1)
        tokens = torch.cat([state.pending_tokens, torch.zeros(batch, k - 1, dtype=torch.int64, device=device)], 1)
        features = torch.cat([state.pending_features, state.pending_features.new_zeros(
            batch, k - 1, state.pending_features.shape[-1])], dim=1)
        x, residual = self._first_layer_input(tokens, features, is_mask)
        h = d.run_layers(x, residual, positions, self.cache)
        # Slot S-1 (the pair ending in y) proposes draft 1; mask slot m proposes draft m+1.
        rows = torch.arange(slots - 1, slots - 1 + k, device=device).expand(batch, k)
        return self._greedy(pick_rows(h, rows))

    def _propose_sequential(self, state: SpecState, k: int) -> Tensor:
        d = self.drafter
        batch, slots = state.pending_tokens.shape
        device = state.pending_tokens.device
        positions, _ = self._real_slots(state)
        no_mask = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        x, residual = self._first_layer_input(state.pending_tokens, state.pending_features, no_mask)
        last_row = torch.full((batch, 1), slots - 1, dtype=torch.int64, device=device)
        h = pick_rows(d.run_layers(x, residual, positions, self.cache), last_row)  # [B, 1, H]
        drafts = [self._greedy(h)[:, 0]]
        one_mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        for step in range(1, k):
            # EAGLE-3 feeds the drafter's own output hidden state back, bypassing fc: one slot per
            # pass, so layer 0's input is built by the plain norms, with nothing to fuse.
            embeds = d.embed(drafts[-1].unsqueeze(-1), one_mask, self.target_embedding)
            position = (state.last_position + step - 1).unsqueeze(-1)
            h = d.run_layers(*d.layers[0].build_input(embeds, h), position, self.cache)
            drafts.append(self._greedy(h)[:, 0])
        return torch.stack(drafts, dim=1)

