"""The n-gram datastore: continuations the target wrote before, looked up by the last committed tokens.

A small target answers in set phrases ("To solve this problem, we need to", "Here is a Python
function that"), the same across prompts. Context lookup (graphs/lookup.py) finds such a phrase only
when this sequence already contains it; the datastore holds them from the target's own answers to
other prompts (built by `neuron_peagle.datastore` from the training responses, the drafter's data).
For each n-gram seen at least twice it keeps the most frequent continuation, `chain_length` tokens
long (each next token the most frequent after the tokens before it), so one lookup supplies a whole
chain of drafts. A non-parametric drafter in the spirit of REST (He et al., 2023), in fixed shapes.

Graph code: one open-addressing hash table per n-gram order, `[slots, n]` keys and `[slots, chain]`
continuations as buffers; a lookup hashes the last n tokens, gathers `probes` consecutive slots and
keeps the one whose key equals them. The hash stays below 2**31 for vocabularies up to 2**18 tokens,
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
    """The continuations of the n-grams of one order, in an open-addressing hash table (buffers)."""

    def __init__(self, slot_keys: Tensor, slot_chains: Tensor) -> None:
        super().__init__()
        # slot_keys [S, n] (EMPTY rows are free slots); slot_chains [S, C] (EMPTY: no token); int32, half
        # the bytes of int64 for tables of a few hundred thousand slots
        self.register_buffer("slot_keys", slot_keys.to(torch.int32), persistent=False)
        self.register_buffer("slot_chains", slot_chains.to(torch.int32), persistent=False)

    @property
    def order(self) -> int:
        return self.slot_keys.shape[1]

    def lookup(self, keys: Tensor) -> Tensor:  # keys [B, n] -> chain [B, C] (EMPTY where unknown)
        slots = self.slot_keys.shape[0]
        first = ngram_hash(keys, slots).unsqueeze(-1)  # [B, 1]
        candidates = (first + torch.arange(PROBES, device=keys.device)) & (slots - 1)  # [B, P]
        hit = (self.slot_keys[candidates] == keys.unsqueeze(1)).all(dim=-1)  # [B, P]
        # A key sits in at most one slot; where none matches, slot index `slots` is out of range: clamp
        # to a row whose chain is then masked.
        slot = torch.where(hit, candidates, torch.full_like(candidates, slots)).min(dim=-1).values  # [B]
        chain = self.slot_chains[slot.clamp(max=slots - 1)].long()  # [B, C]
        return torch.where(hit.any(dim=-1, keepdim=True), chain, torch.full_like(chain, EMPTY))


class NgramDatastore(nn.Module):
    """Tables of orders max_order down to min_order; the longest order that knows the n-gram wins."""

    def __init__(self, tables: list[NgramTable]) -> None:
        super().__init__()
        self.tables = nn.ModuleList(sorted(tables, key=lambda t: t.order))
        self.chain_length = tables[0].slot_chains.shape[1]

    def lookup(self, history: Tensor, last_position: Tensor, num_draft_tokens: int) -> tuple[Tensor, Tensor]:
        """history [B, L] int64, last_position [B] -> (tokens [B, K], found [B, K] bool): the stored
        continuation of the longest known n-gram ending at last_position (n-grams reaching before
        position 0 are not looked up)."""
        batch = history.shape[0]
        width = min(num_draft_tokens, self.chain_length)
        tokens = torch.full((batch, width), EMPTY, dtype=history.dtype, device=history.device)
        for table in self.tables:  # shortest first: a longer order, where it knows the n-gram, overrides
            n = table.order
            index = last_position.unsqueeze(-1) - n + 1 + torch.arange(n, device=history.device)  # [B, n]
            chain = table.lookup(history.gather(1, index.clamp(min=0)))[:, :width]
            known = (chain[:, :1] != EMPTY) & (last_position.unsqueeze(-1) >= n - 1)  # [B, 1]
            tokens = torch.where(known, chain, tokens)
        if width < num_draft_tokens:
            tokens = torch.cat([tokens, tokens.new_full((batch, num_draft_tokens - width), EMPTY)], dim=1)
        return tokens, tokens != EMPTY
