"""Token selection and speculative acceptance as fixed-shape tensor code (traceable, no RNG inside).

Randomness comes in as uniform tensors drawn on the host by `HostRandom`, so the graphs are pure
functions of their inputs: a seeded request is reproducible on every backend, and no device RNG state
has to be carried between graphs.

Acceptance follows the speculative-sampling rule of Leviathan et al. (arXiv 2211.17192) and Chen et
al. (arXiv 2302.01318). With p the target distribution and q the draft distribution at a position
and x ~ q the draft token:
- x is *accepted* with probability min(1, p(x) / q(x));
- at the first rejection a *recovered* token is sampled from normalize(max(0, p - q)) and the step
  stops there;
- if all K drafts are accepted, a *bonus* token is sampled from p at position K+1.
The committed tokens are then distributed exactly as p would produce them one at a time. Drafts
chosen greedily have a one-hot q: accept with probability p(x); recover from p with x removed.
Greedy decoding is the one-hot-p special case and gives exactly the longest-matching-prefix rule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SamplingTensors(NamedTuple):
    temperature: Tensor  # [B] float32; 0 means greedy for that row
    top_k: Tensor  # [B] int64; 0 means no top-k
    top_p: Tensor  # [B] float32; 1.0 means no top-p


def sampling_tensors(batch_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
                     ) -> SamplingTensors:
    return SamplingTensors(torch.full((batch_size,), float(temperature)),
                           torch.full((batch_size,), int(top_k), dtype=torch.int64),
                           torch.full((batch_size,), float(top_p)))


def target_probs(logits: Tensor, sampling: SamplingTensors) -> Tensor:
    """logits [B, R, V] -> probabilities [B, R, V] (float32) after temperature, top-k, top-p.

    Rows with temperature 0 get a one-hot at the argmax. Top-k and top-p use one descending sort over
    the vocabulary; a full-vocabulary sort compiles slowly on Neuron and is a target for a kernel.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    temperature = sampling.temperature.float().view(-1, 1, 1)
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)

    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).view(1, 1, vocab)
    top_k = sampling.top_k.view(-1, 1, 1)
    keep = (top_k <= 0) | (rank < top_k)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < p.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = keep & (mass_before < sampling.top_p.float().view(-1, 1, 1))
    kept_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(-1, order, kept_logits)
    probs = torch.softmax(filtered, dim=-1)

    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    return torch.where(greedy, one_hot, probs)


def sample_from_probs(probs: Tensor, uniform: Tensor) -> Tensor:
    """probs [B, R, V], uniform [B, R] in [0, 1) -> token ids [B, R] by inverse CDF.

    The index is the number of entries whose cumulative mass is <= u * total: strict, so a token of
    zero probability is never chosen and a one-hot row always gives its hot index.
    """
    cdf = probs.cumsum(-1)
    threshold = uniform.unsqueeze(-1) * cdf[..., -1:]
    index = (cdf <= threshold).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)


def sample_tokens(logits: Tensor, sampling: SamplingTensors, uniform: Tensor) -> Tensor:
    """[B, R, V] logits, uniform [B, R] -> [B, R] token ids."""
    return sample_from_probs(target_probs(logits, sampling), uniform)


def _commit(draft_tokens: Tensor, accepted: Tensor, final_tokens: Tensor) -> tuple[Tensor, Tensor]:
    # draft_tokens [B, K], accepted [B, K] bool, final_tokens [B, K+1] (recovered/bonus per position)
    k = draft_tokens.shape[1]
    # Leading accepts: positions before the first rejection (cumsum, not cumprod, which XLA lacks).
    num_accepted = ((~accepted).long().cumsum(dim=1) == 0).sum(dim=1)  # [B]
    position = torch.arange(k + 1, device=draft_tokens.device).unsqueeze(0)
    drafts_padded = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1)
    final = final_tokens.gather(1, num_accepted.unsqueeze(1))  # [B, 1]
    n = num_accepted.unsqueeze(1)
    tokens = torch.where(position < n, drafts_padded, torch.where(position == n, final, -torch.ones_like(final)))
    return tokens, num_accepted + 1


def greedy_accept(draft_tokens: Tensor, target_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """draft_tokens [B, K], target_tokens [B, K+1] (target argmax per verify position)
    -> (committed tokens [B, K+1] padded with -1, counts [B] in 1..K+1)."""
    accepted = draft_tokens == target_tokens[:, :-1]
    return _commit(draft_tokens, accepted, target_tokens)


def rejection_accept(draft_tokens: Tensor, target_probs: Tensor, accept_uniform: Tensor,
                     sample_uniform: Tensor, draft_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling.

    draft_tokens [B, K]; target_probs [B, K+1, V] (processed by `target_probs`); accept_uniform [B, K];
    sample_uniform [B, K+1]; draft_probs [B, K, V], or None when drafts were chosen greedily (q one-hot).
    -> (committed tokens [B, K+1] padded with -1, counts [B] in 1..K+1).
    """
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    p_draft = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, K]
    if draft_probs is None:
        q = torch.nn.functional.one_hot(draft_tokens, vocab).to(target_probs.dtype)
    else:
        q = draft_probs.to(target_probs.dtype)
    q_draft = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    accepted = accept_uniform * q_draft < p_draft

    # Residual distributions for every position at once; position K (the bonus) uses p itself.
    q_full = torch.cat([q, torch.zeros_like(target_probs[:, :1])], dim=1)  # [B, K+1, V]
    residual = (target_probs - q_full).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # Exact arithmetic never leaves an empty residual where a rejection happened; rounding can.
    residual = torch.where(mass > 0, residual, target_probs)
    final_tokens = sample_from_probs(residual, sample_uniform)
    return _commit(draft_tokens, accepted, final_tokens)


class HostRandom:
    """Seeded per-row host RNG: row i's uniforms come from its own generator, so a seeded request
    gets the same random stream whatever batch it lands in."""

    def __init__(self, seeds: list[int | None]) -> None:
        self.generators = []
        for seed in seeds:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
            self.generators.append(generator)

    def uniform(self, per_row: int) -> Tensor:  # -> [B, per_row] float32 in [0, 1)
        return torch.stack([torch.rand(per_row, generator=g) for g in self.generators])
