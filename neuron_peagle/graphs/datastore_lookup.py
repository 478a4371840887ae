"""The n-gram datastore: continuations the target wrote before, looked up by the last committed tokens.

A small target answers in set phrases ("To solve this problem, we need to", "Here is a Python
function that"), the same across prompts. Context lookup (graphs/lookup.py) finds such a phrase only
when this sequence already contains it; the datastore holds them from the target's own answers to
other prompts (built by `neuron_peagle.datastore` from the training responses, the drafter's data).
For each n-gram it keeps the token seen most often after it; a chain of drafts is K lookups, each
token the most frequent one after the longest known n-gram ending before it. A non-parametric
drafter in the spirit of REST (He et al., 2023), in fixed shapes. Storing next tokens rather than
whole continuations gives the same chains (a continuation's tail is the chain of the n-gram its
first token ends) at a fraction of the size, so n-grams seen only once fit too.

Graph code: one open-addressing hash table for every n-gram order, `[slots, max_order]` keys (a
shorter n-gram left-padded with PAD) and `[slots]` next tokens as buffers; a lookup hashes the key of
every order at once, gathers `probes` consecutive slots for each and keeps the slot whose key equals
it, so a chain step costs one set of small ops whatever the number of orders. The hash stays within
int32 for vocabularies up to 2**18 tokens, so it is the same in int32 arithmetic (which a device may
use for int64) as in int64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Their sum is below 2**13, so a weighted sum of ids below 2**18 stays below 2**31: no overflow in int32.
HASH_MULTIPLIERS = (4093, 2039, 1021, 509, 251, 127, 61, 1)
MAX_VOCAB = 2 ** 18
PROBES = 8
EMPTY = -1  # no token: a free slot's key, an unknown next token
PAD = -2  # fills the front of a shorter n-gram's key


def ngram_hash(keys: Tensor, slots: int, weights: Tensor | None = None) -> Tensor:
    """keys [..., n] int64 token ids (< MAX_VOCAB, or PAD) -> [...] slot in [0, slots) (a power of 2).
    `weights`: HASH_MULTIPLIERS[:n] as a tensor, where the caller keeps one."""
    if weights is None:
        weights = torch.tensor(HASH_MULTIPLIERS[:keys.shape[-1]], dtype=keys.dtype, device=keys.device)
    mixed = (keys * weights).sum(dim=-1)  # in (-2**14, 2**31)
    return (mixed ^ (mixed >> 7) ^ (mixed >> 17)) & (slots - 1)


class NgramTable(nn.Module):
    """The most frequent next token after each n-gram, in an open-addressing hash table."""

    def __init__(self, slot_keys: Tensor, slot_next: Tensor) -> None:
        super().__init__()
        # slot_keys [S, n] (EMPTY rows are free slots); slot_next [S] (EMPTY in free slots); int32, half
        # the bytes of int64 for tables of a few hundred thousand slots
        self.register_buffer("slot_keys", slot_keys.to(torch.int32), persistent=False)
        self.register_buffer("slot_next", slot_next.to(torch.int32), persistent=False)
        self.register_buffer("hash_weights", torch.tensor(HASH_MULTIPLIERS[:slot_keys.shape[1]]), persistent=False)
        self.register_buffer("probe_offsets", torch.arange(PROBES), persistent=False)

    @property
    def order(self) -> int:
        return self.slot_keys.shape[1]

    def lookup(self, keys: Tensor) -> Tensor:  # keys [B, n] -> next token [B] (EMPTY where unknown)
        slots = self.slot_keys.shape[0]
        first = ngram_hash(keys, slots, self.hash_weights).unsqueeze(-1)  # [B, 1]
        candidates = (first + self.probe_offsets) & (slots - 1)  # [B, P]
        hit = (self.slot_keys[candidates] == keys.unsqueeze(1)).all(dim=-1)  # [B, P]
        # A key sits in at most one slot; where none matches, slot index `slots` is out of range: clamp
        # to a row whose token is then masked.
        slot = candidates.masked_fill(~hit, slots).min(dim=-1).values  # [B]
        token = self.slot_next[slot.clamp(max=slots - 1)].to(keys.dtype)  # [B]
        return token.masked_fill(~hit.any(dim=-1), EMPTY)


class NgramDatastore(nn.Module):
    """The next-token table of n-grams of orders `orders` (keys left-padded to the longest); the
    longest order that knows the n-gram wins."""

    def __init__(self, table: NgramTable, orders: tuple[int, ...]) -> None:
        super().__init__()
        self.table = table
        self.orders = tuple(sorted(orders))
        self.max_order = self.orders[-1]
        if table.order != self.max_order:
            raise ValueError(f"table keys are {table.order} wide, the longest order is {self.max_order}")
        # columns [O, max_order] of [PAD | context] that order o's key reads: PAD (0) in front, then its
        # last n context tokens
        columns = [[0] * (self.max_order - n) + list(range(self.max_order - n + 1, self.max_order + 1))
                   for n in self.orders]
        self.register_buffer("key_columns", torch.tensor(columns), persistent=False)

    def next_token(self, context: Tensor) -> Tensor:
        """context [B, max_order] (EMPTY: no token) -> [B] the next token after the longest known n-gram
        that ends it (EMPTY where none is known)."""
        padded = torch.cat([torch.full_like(context[:, :1], PAD), context], dim=1)  # [B, 1 + max_order]
        keys = padded[:, self.key_columns]  # [B, O, max_order], shortest order first
        found = self.table.lookup(keys.flatten(0, 1)).view(keys.shape[:2])  # [B, O]
        found = found.masked_fill((keys == EMPTY).any(dim=-1), EMPTY)
        token = found[:, 0]
        for o in range(1, found.shape[1]):  # a longer order, where it knows the n-gram, overrides
            token = torch.where(found[:, o] != EMPTY, found[:, o], token)
        return token

    def lookup(self, history: Tensor, last_position: Tensor, num_speculative_tokens: int) -> tuple[Tensor, Tensor]:
        """history [B, L] int64, last_position [B] -> (tokens [B, K], found [B, K] bool): the chain of
        next tokens after last_position, each after the longest known n-gram ending before it (n-grams
        reaching before position 0 are not looked up). A chain stops at its first unknown token: every
        later n-gram holds that EMPTY."""
        window = last_position.unsqueeze(-1) - self.max_order + 1 + torch.arange(self.max_order, device=history.device)
        context = history.gather(1, window.clamp(min=0))  # [B, max_order]
        context = context.masked_fill(window < 0, EMPTY)
        tokens = []
        for _ in range(num_speculative_tokens):
            token = self.next_token(context)  # [B]
            tokens.append(token)
            context = torch.cat([context[:, 1:], token.unsqueeze(-1)], dim=1)
        drafts = torch.stack(tokens, dim=1)  # [B, K]
        return drafts, drafts != EMPTY
