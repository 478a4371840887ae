"""The speculative step's own state, kept on the device between step graphs.

`SpecState` is sized for the longest K the engine drafts (`S = K + 1` slots):

    pending_features [B, S, 3H]  target features of the positions committed last step,
    pending_tokens   [B, S]      and the token that followed each, right-aligned:
    pending_count    [B]         the last `pending_count` slots are valid (1..S).
    last_position    [B]         position of y, the last committed token (its target KV is not
                                 written yet; y = pending_tokens[:, S-1]).

The step graphs (graphs/speculative.py) write it, through its `StateModule` methods (in the way the
backend chose: neuron_peagle.state_writes); every proposer (graphs/proposers.py) reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuron_peagle.state_writes import StateModule


class SpecState(StateModule):
    def __init__(self, batch_size: int, num_speculative_tokens: int, feature_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        slots = num_speculative_tokens + 1
        self.register_buffer("pending_features", torch.zeros(batch_size, slots, feature_size, dtype=dtype),
                             persistent=False)
        self.register_buffer("pending_tokens", torch.zeros(batch_size, slots, dtype=torch.int64), persistent=False)
        self.register_buffer("pending_count", torch.ones(batch_size, dtype=torch.int64), persistent=False)
        # As after the prefill of a one-token prompt, so a step before any prefill (a warm-up, a timing)
        # writes in range.
        self.register_buffer("last_position", torch.ones(batch_size, dtype=torch.int64), persistent=False)

    def pending_positions(self) -> tuple[Tensor, Tensor]:
        """Sequence positions of the pending tokens [B, S] (slot S-1 is y, at last_position) and which
        slots hold one [B, S] bool (the last pending_count)."""
        slots = self.pending_tokens.shape[1]
        j = torch.arange(slots, device=self.last_position.device)
        return self.last_position.unsqueeze(-1) - (slots - 1) + j, j >= (slots - self.pending_count).unsqueeze(-1)

    def hold(self, features: Tensor, tokens: Tensor, count: Tensor, last_position: Tensor) -> None:
        """The pending pairs for the next step: features [B, S, 3H] and tokens [B, S], right-aligned,
        the last `count` [B] of them valid; y (tokens[:, S-1]) at `last_position` [B]."""
        self.assign("pending_features", features)
        self.assign("pending_tokens", tokens)
        self.assign("pending_count", count)
        self.assign("last_position", last_position)
