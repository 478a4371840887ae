"""Draft proposers: the part of a speculative step that guesses the next K tokens.

All of them see the same `SpecState` (kept on the device by the step graph):

    pending_features [B, K+1, 3H]  target features of the positions committed last step,
    pending_tokens   [B, K+1]      and the token that followed each, right-aligned:
    pending_count    [B]           the last `pending_count` slots are valid (1..K+1).
    last_position    [B]           position of y, the last committed token (its target KV is not
                                   written yet; y = pending_tokens[:, K]).

A drafter slot at position p pairs (feature f_p, token t_{p+1}); so the pending pairs sit at drafter
positions last_position - pending_count .. last_position - 1, and the last one predicts draft 1.
Slots that hold nothing (left padding of the pending block, padding of a prompt bucket) write to the
drafter cache's last slot, a trash slot that no query ever reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuron_peagle.kv_cache import KVCache
from neuron_peagle.models.drafter import Drafter
from neuron_peagle.models.target import TargetModel


class SpecState(nn.Module):
    def __init__(self, batch_size: int, num_draft_tokens: int, feature_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        slots = num_draft_tokens + 1
        self.register_buffer("pending_features", torch.zeros(batch_size, slots, feature_size, dtype=dtype),
                             persistent=False)
        self.register_buffer("pending_tokens", torch.zeros(batch_size, slots, dtype=torch.int64), persistent=False)
        self.register_buffer("pending_count", torch.ones(batch_size, dtype=torch.int64), persistent=False)
        self.register_buffer("last_position", torch.zeros(batch_size, dtype=torch.int64), persistent=False)


class DrafterProposer(nn.Module):
    """P-EAGLE parallel drafting (one drafter pass) or EAGLE-style sequential drafting (K passes)."""

    def __init__(self, drafter: Drafter, target: TargetModel, batch_size: int, num_draft_tokens: int,
                 parallel: bool) -> None:
        super().__init__()
        self.drafter = drafter
        self.target_embedding = target.embed_tokens
        self.cache = drafter.new_cache(batch_size)
        self.num_draft_tokens = num_draft_tokens
        self.parallel = parallel
        self.trash = drafter.max_length - 1

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        # features [B, T, 3H], input_ids [B, T], lengths [B]: pairs (f_i, t_{i+1}) for i <= n-2.
        # The last prompt pair (f_{n-1}, first new token) stays pending for the first step.
        batch, bucket = input_ids.shape
        slot = torch.arange(bucket, device=input_ids.device).expand(batch, bucket)
        valid = slot <= (lengths - 2).unsqueeze(-1)
        next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        no_mask = torch.zeros_like(valid)
        embeds = self.drafter.embed(next_tokens, no_mask, self.target_embedding)
        hidden = self.drafter.project(features, no_mask)
        positions = torch.where(valid, slot, torch.full_like(slot, self.trash))
        self.drafter(embeds, hidden, positions, self.cache, None)

    def _real_slots(self, state: SpecState) -> tuple[Tensor, Tensor]:
        k = self.num_draft_tokens
        j = torch.arange(k + 1, device=state.last_position.device)
        positions = state.last_position.unsqueeze(-1) - (k + 1) + j  # [B, K+1]
        valid = j >= (k + 1 - state.pending_count).unsqueeze(-1)
        return torch.where(valid, positions, torch.full_like(positions, self.trash)), valid

    def propose(self, state: SpecState) -> Tensor:  # -> drafts [B, K] (target vocabulary ids)
        return self._propose_parallel(state) if self.parallel else self._propose_sequential(state)

    def _propose_parallel(self, state: SpecState) -> Tensor:
        k, d = self.num_draft_tokens, self.drafter
        batch = state.pending_tokens.shape[0]
        device = state.pending_tokens.device
        real_positions, _ = self._real_slots(state)
        mask_positions = state.last_position.unsqueeze(-1) + torch.arange(k - 1, device=device)  # [B, K-1]
        positions = torch.cat([real_positions, mask_positions], dim=1)  # [B, 2K]
        is_mask = torch.cat([torch.zeros(batch, k + 1, dtype=torch.bool, device=device),
                             torch.ones(batch, k - 1, dtype=torch.bool, device=device)], dim=1)
        tokens = torch.cat([state.pending_tokens, torch.zeros(batch, k - 1, dtype=torch.int64, device=device)], 1)
        features = torch.cat([state.pending_features, state.pending_features.new_zeros(
            batch, k - 1, state.pending_features.shape[-1])], dim=1)
        embeds = d.embed(tokens, is_mask, self.target_embedding)
        hidden = d.project(features, is_mask)
        # Slot K (the pair ending in y) proposes draft 1; mask slot m proposes draft m+1.
        rows = torch.arange(k, 2 * k, device=device).expand(batch, k)
        logits, _ = d(embeds, hidden, positions, self.cache, rows)
        return d.to_target_ids(logits.argmax(-1))

    def _propose_sequential(self, state: SpecState) -> Tensor:
        k, d = self.num_draft_tokens, self.drafter
        batch = state.pending_tokens.shape[0]
        device = state.pending_tokens.device
        positions, _ = self._real_slots(state)
        no_mask = torch.zeros(batch, k + 1, dtype=torch.bool, device=device)
        embeds = d.embed(state.pending_tokens, no_mask, self.target_embedding)
        hidden = d.project(state.pending_features, no_mask)
        last_row = torch.full((batch, 1), k, dtype=torch.int64, device=device)
        logits, h = d(embeds, hidden, positions, self.cache, last_row)
        drafts = [d.to_target_ids(logits[:, 0].argmax(-1))]
        one_mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        first_row = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        for step in range(1, k):
            # EAGLE-3 feeds the drafter's own output hidden state back, bypassing fc.
            embeds = d.embed(drafts[-1].unsqueeze(-1), one_mask, self.target_embedding)
            position = (state.last_position + step - 1).unsqueeze(-1)
            logits, h = d(embeds, h, position, self.cache, first_row)
            drafts.append(d.to_target_ids(logits[:, 0].argmax(-1)))
        return torch.stack(drafts, dim=1)


class TableProposer(nn.Module):
    """Proposes tokens read from a table of known continuations: `table[b, p]` is the draft for
    position p. Filled with the target's own greedy output it is an oracle (everything accepted);
    with some entries corrupted, a drafter that is right some of the time. For tests and benchmarks
    of the verify/accept path, independent of any drafter's quality."""

    def __init__(self, batch_size: int, max_length: int, num_draft_tokens: int) -> None:
        super().__init__()
        self.num_draft_tokens = num_draft_tokens
        self.register_buffer("table", torch.zeros(batch_size, max_length, dtype=torch.int64), persistent=False)

    def prefill(self, features: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        pass

    def propose(self, state: SpecState) -> Tensor:
        offsets = torch.arange(1, self.num_draft_tokens + 1, device=state.last_position.device)
        index = (state.last_position.unsqueeze(-1) + offsets).clamp(max=self.table.shape[1] - 1)
        return self.table.gather(1, index)
