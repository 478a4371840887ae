"""Fixed-shape KV cache buffers.

Layout: one key and one value buffer per layer, each `[batch, kv_heads, max_length, head_dim]`.
Sliding-window layers (gpt-oss) hold a ring of their own window's size instead (see `KVCache`).
Entries are written by scatter at their position ids (see `models.layers.Attention`); attention
reads the slots [0, read_length) and masks by position, so a slot past a sequence's committed length
is never read and needs no clearing. On a device backend the buffers are the graphs' aliased state:
they stay resident and are updated in place (rebound to out-of-place updates for the nxd trace:
graphs/state.py), and read_length stays max_length (one shape per graph).
On eager, where shapes cost nothing, the backend narrows read_length to the live context
(`rounded_read_length` of the slot the call reaches, which each graph says in `cache_extent`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


WINDOW_STEP = 128
# The position recorded for a ring slot that holds nothing: above every query, so never visible.
NO_POSITION = 1 << 40


def step_room(num_speculative_tokens: int) -> int:
    """Cache slots a decode step writes past a sequence's committed tokens: a speculative step writes the
    pending token and its K drafts (K+1); plain decoding writes only what it commits (0). The one place
    this limit is computed: prompts are checked against it, and the host loop and the step graph keep
    positions of finished rows within it."""
    return num_speculative_tokens + 1 if num_speculative_tokens else 0


class KVCache(nn.Module):
    """`window_slots` S, with `sliding` flags per layer: those layers (gpt-oss's sliding-window ones)
    hold a ring of S slots instead of max_length, and `window_positions` [batch, S] records the position
    each ring slot holds (models.layers.WindowPlan)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, sliding: tuple[bool, ...] = (),
                 window_slots: int = 0) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.read_length = max_length  # attention reads slots [0, read_length); only eager narrows it
        self.sliding = tuple(sliding) or (False,) * num_layers
        ring = (batch_size, num_kv_heads, window_slots, head_dim)
        for i in range(num_layers):
            shape = ring if self.sliding[i] else self.shape
            self.register_buffer(f"key_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"value_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
        positions = torch.full((batch_size, window_slots), NO_POSITION, dtype=torch.int64) if any(self.sliding) else None
        self.register_buffer("window_positions", positions, persistent=False)

    @property
    def max_length(self) -> int:
        return self.shape[2]

    def rounded_read_length(self, last_slot: int) -> int:
        """A read_length covering slots [0, last_slot]: rounded up to a multiple of WINDOW_STEP."""
        return min(self.max_length, WINDOW_STEP * (last_slot // WINDOW_STEP + 1))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"key_{i}"), getattr(self, f"value_{i}")
