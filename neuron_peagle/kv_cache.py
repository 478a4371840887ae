"""Fixed-shape KV cache buffers and their writes.

Layout: one key and one value buffer per layer, each `[batch, kv_heads, max_length, head_dim]`.
Sliding-window layers (gpt-oss) hold a ring of their own window's size instead (see `KVCache`).
Attention hands each layer's new entries to the cache (`KVCache.write`, `KVCache.write_ring`), which
scatters them at their position ids; attention reads the slots [0, read_length) and masks by
position, so a slot past a sequence's committed length is never read and needs no clearing. The
cache is a `StateModule`: how its writes happen (in place, or rebound to out-of-place results for the
nxd trace) is the backend's choice (neuron_peagle.state_writes). On a device backend the buffers are
the graphs' aliased state, and read_length stays max_length (one shape per graph).
On eager, where shapes cost nothing, the backend narrows read_length to the live context
(`rounded_read_length` of the last slot the call reaches, which each graph says in `cache_extent`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neuron_peagle.state_writes import StateModule

READ_STEP = 128
# The position recorded for a ring slot that holds nothing: above every query, so never visible.
NO_POSITION = 1 << 40


def step_room(num_speculative_tokens: int) -> int:
    """Cache slots a decode step writes past a sequence's committed tokens: a speculative step writes the
    pending token and its K drafts (K+1); plain decoding writes only what it commits (0). The one place
    this limit is computed: prompts are checked against it, and the host loop and the step graph keep
    positions of finished rows within it."""
    return num_speculative_tokens + 1 if num_speculative_tokens else 0


class WindowPlan(NamedTuple):
    """How one forward updates the rings of the sliding-window layers (all of one window size W).

    A ring has S = W + T_step - 1 slots (T_step: the most tokens a decode or verify call writes); slot s
    holds the newest position p with p % S == s. S >= W + T_step - 1 keeps every key a later query can
    see, even after a verify wrote drafts that are then rejected (their positions are rewritten later).
    The new entries are the T inputs (positions p0..p0+T-1; the first `valid` of them are written: a
    prefill's prompt, not its padding). Computed once per forward by the target, shared by its layers.
    """

    old_positions: Tensor  # [B, S] the slots' positions before this call (NO_POSITION where stale or empty)
    source: Tensor  # [B, S] which new entry (index into T) each slot takes
    take_new: Tensor  # [B, S] bool: the slot takes that new entry (else it keeps its own)
    positions: Tensor  # [B, S] the slots' positions after this call


def plan_window(ring_positions: Tensor, position_ids: Tensor, valid: Tensor | None) -> WindowPlan:
    """ring_positions [B, S]; position_ids [B, T] contiguous per row; valid [B] entries written (None: T)."""
    slots = ring_positions.shape[1]
    first = position_ids[:, :1]  # [B, 1]
    last = position_ids[:, -1:] if valid is None else first + valid.unsqueeze(-1) - 1  # newest written position
    # Entries at or after this call's first position are stale (rejected drafts, an earlier sequence).
    old = torch.where(ring_positions >= first, torch.full_like(ring_positions, NO_POSITION), ring_positions)
    slot = torch.arange(slots, device=position_ids.device).unsqueeze(0)  # [1, S]
    newest = last - torch.remainder(last - slot, slots)  # [B, S] newest position <= last in each slot
    take_new = newest >= first
    source = (newest - first).clamp(min=0, max=position_ids.shape[1] - 1)
    return WindowPlan(old, source, take_new, torch.where(take_new, newest, old))


class KVCache(StateModule):
    """`window_slots` S, with `sliding` flags per layer: those layers (gpt-oss's sliding-window ones)
    hold a ring of S slots instead of max_length, and `window_positions` [batch, S] records the position
    each ring slot holds (`WindowPlan`)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, sliding: tuple[bool, ...] = (),
                 window_slots: int = 0) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.read_length = max_length  # attention reads slots [0, read_length)
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
        """A read_length covering slots [0, last_slot]: rounded up to a multiple of READ_STEP."""
        return min(self.max_length, READ_STEP * (last_slot // READ_STEP + 1))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's key and value buffers, as they are now."""
        return getattr(self, f"key_{i}"), getattr(self, f"value_{i}")

    def write(self, layer: int, position_ids: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write a full-length layer's new entries, keys and values [B, kv_heads, T, hd], at the slots of
        their position ids [B, T] (cast to the cache's dtype). Returns what attention reads of the layer
        then: its keys and values [B, kv_heads, read_length, hd]."""
        batch, heads, seq, dim = keys.shape
        index = position_ids.view(batch, 1, seq, 1).expand(batch, heads, seq, dim)
        key_cache = self.scatter(f"key_{layer}", 2, index, keys)
        value_cache = self.scatter(f"value_{layer}", 2, index, values)
        if self.read_length < self.max_length:
            return key_cache[:, :, :self.read_length], value_cache[:, :, :self.read_length]
        return key_cache, value_cache

    def prefill_extent(self, name: str, bucket: int) -> tuple[int, int] | None:
        """A full-length layer's row holds the prefill's entries in slots [0, bucket) (later slots are
        never read before they are written); rings and their positions are taken whole."""
        if name.startswith(("key_", "value_")) and not self.sliding[int(name.split("_")[1])]:
            return 2, min(bucket, self.max_length)
        return None

    def plan_window(self, position_ids: Tensor, valid: Tensor | None) -> WindowPlan | None:
        """How this call's entries (positions [B, T], the first `valid` [B] written; None: all T) land in
        the rings; None for a cache without sliding-window layers."""
        if self.window_positions is None:
            return None
        return plan_window(self.window_positions, position_ids, valid)

    def write_ring(self, layer: int, keys: Tensor, values: Tensor, window: WindowPlan) -> None:
        """A sliding-window layer's ring [B, kv_heads, S, hd]: each slot that takes a new entry (keys,
        values [B, kv_heads, T, hd]) is given it, per `window`."""
        for name, new in ((f"key_{layer}", keys), (f"value_{layer}", values)):
            ring = self._state(name)
            batch, heads, slots, dim = ring.shape
            index = window.source.view(batch, 1, slots, 1).expand(batch, heads, slots, dim)
            taken = new.to(ring.dtype).gather(2, index)
            self.assign(name, torch.where(window.take_new.view(batch, 1, slots, 1), taken, ring))

    def advance_window(self, window: WindowPlan) -> None:
        """Record the ring slots' positions after the call `window` planned (once all layers wrote)."""
        self.assign("window_positions", window.positions)
