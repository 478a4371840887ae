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

Graph code: one open-addressing hash table per n-gram order, `[slots, n]` keys and `[slots]` next
tokens as buffers; a lookup hashes the last n tokens, gathers `probes` consecutive slots and keeps
the one whose key equals them. The hash stays below 2**31 for vocabularies up to 2**18 tokens,
so it is the same in int32 arithmetic (which a device may use for int64) as in int64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Their sum is below 2**13, so a weighted sum of ids below 2**18 stays below 2**31: no overflow in int32.
HASH_MULTIPLIERS = (4093, 2039, 1021, 509, 251, 127, 61, 1)
MAX_VOCAB = 2 ** 18
PROBES = 8
EMPTY = -1


def ngram_hash(keys: Tensor, slots: int) -> Tensor:
    """keys [..., n] int64 token ids (< MAX_VOCAB) -> [...] slot in [0, slots) (slots: a power of 2)."""
    order = keys.shape[-1]
    weights = torch.tensor(HASH_MULTIPLIERS[:order], dtype=keys.dtype, device=keys.device)
    mixed = (keys * weights).sum(dim=-1)  # < 2**31
    return (mixed ^ (mixed >> 7) ^ (mixed >> 17)) & (slots - 1)


class NgramTable(nn.Module):
    """The most frequent next token after each n-gram of one order, in an open-addressing hash table."""

    def __init__(self, slot_keys: Tensor, slot_next: Tensor) -> None:
        super().__init__()
        # slot_keys [S, n] (EMPTY rows are free slots); slot_next [S] (EMPTY in free slots); int32, half
        # the bytes of int64 for tables of a few hundred thousand slots
        self.register_buffer("slot_keys", slot_keys.to(torch.int32), persistent=False)
        self.register_buffer("slot_next", slot_next.to(torch.int32), persistent=False)

    @property
    def order(self) -> int:
        return self.slot_keys.shape[1]

    def lookup(self, keys: Tensor) -> Tensor:  # keys [B, n] -> next token [B] (EMPTY where unknown)
        slots = self.slot_keys.shape[0]
        first = ngram_hash(keys, slots).unsqueeze(-1)  # [B, 1]
        candidates = (first + torch.arange(PROBES, device=keys.device)) & (slots - 1)  # [B, P]
        hit = (self.slot_keys[candidates] == keys.unsqueeze(1)).all(dim=-1)  # [B, P]
        # A key sits in at most one slot; where none matches, slot index `slots` is out of range: clamp
        # to a row whose token is then masked.
        slot = torch.where(hit, candidates, torch.full_like(candidates, slots)).min(dim=-1).values  # [B]
        token = self.slot_next[slot.clamp(max=slots - 1)].to(keys.dtype)  # [B]
        return torch.where(hit.any(dim=-1), token, torch.full_like(token, EMPTY))


class NgramDatastore(nn.Module):
    """Tables of orders min_order..max_order; the longest order that knows the n-gram wins."""

    def __init__(self, tables: list[NgramTable]) -> None:
        super().__init__()
        self.tables = nn.ModuleList(sorted(tables, key=lambda t: t.order))
        self.max_order = self.tables[-1].order

    def next_token(self, context: Tensor) -> Tensor:
        """context [B, max_order] (EMPTY: no token) -> [B] the next token after the longest known n-gram
        that ends it (EMPTY where none is known)."""
        token = torch.full_like(context[:, 0], EMPTY)
        for table in self.tables:  # shortest first: a longer order, where it knows the n-gram, overrides
            key = context[:, -table.order:]  # [B, n]
            found = table.lookup(key)
            token = torch.where((key != EMPTY).all(dim=-1) & (found != EMPTY), found, token)
        return token

    def lookup(self, history: Tensor, last_position: Tensor, num_draft_tokens: int) -> tuple[Tensor, Tensor]:
        """history [B, L] int64, last_position [B] -> (tokens [B, K], found [B, K] bool): the chain of
        next tokens after last_position, each after the longest known n-gram ending before it (n-grams
        reaching before position 0 are not looked up). A chain stops at its first unknown token: every
        later n-gram holds that EMPTY."""
        window = last_position.unsqueeze(-1) - self.max_order + 1 + torch.arange(self.max_order, device=history.device)
        context = history.gather(1, window.clamp(min=0))  # [B, max_order]
        context = torch.where(window >= 0, context, torch.full_like(context, EMPTY))
        tokens = []
        for _ in range(num_draft_tokens):
            token = self.next_token(context)  # [B]
            tokens.append(token)
            context = torch.cat([context[:, 1:], token.unsqueeze(-1)], dim=1)
        drafts = torch.stack(tokens, dim=1)  # [B, K]
        return drafts, drafts != EMPTY
