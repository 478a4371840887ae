"""Token selection and speculative acceptance as fixed-shape tensor code (traceable, no RNG inside).

Everything here except `HostRandom` is graph code: it is traced into XLA /
Neuron graphs, so it has no `.item()`, no `nonzero`, no Python branch on a tensor value and no
data-dependent shape. Randomness comes in as uniform tensors drawn on the host by `HostRandom`, so
the graphs are pure functions of their inputs: a seeded request is reproducible on every backend and
no device RNG state has to be carried from one graph to the next.

Acceptance is the speculative-sampling rule of Leviathan et al. (arXiv 2211.17192) and Chen et al.
(arXiv 2302.01318). At each of the K draft positions let p be the target distribution, q the draft
distribution and d ~ q the draft token. Terms:

- *accepted* tokens: draft d is accepted with probability min(1, p(d) / q(d)); the step keeps the
  longest run of leading accepted drafts, n of them (0 <= n <= K).
- *recovered* token: at the first rejected position (n < K) one token is sampled from
  normalize(max(0, p - q)) and the step stops there.
- *bonus* token: when all K drafts are accepted, one more token is sampled from the target's
  distribution at position K+1, which the verify pass computed anyway.

Every step therefore commits n + 1 tokens, and they are distributed exactly as if the target had
sampled them one at a time. Drafts chosen greedily (argmax) have a one-hot q: accept with probability
p(d), recover from p with d removed. Greedy decoding is the one-hot-p case and reduces to the
longest-matching-prefix rule of `greedy_accept`.

Shapes: B = batch rows, K = draft tokens per step, R = positions per row, V = vocabulary size.
Committed tokens come back as [B, K+1] padded with `PAD_TOKEN` after the n + 1 valid entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


PAD_TOKEN = -1  # fills the committed-token slots after the n + 1 valid ones


class SamplingTensors(NamedTuple):
    temperature: Tensor  # [B] float32; 0 means greedy for that row
    top_k: Tensor  # [B] int64; 0 means no top-k
    top_p: Tensor  # [B] float32; 1.0 means no top-p


def target_probs(logits: Tensor, sampling: SamplingTensors) -> Tensor:
    """Processed distribution: temperature, then top-k, then top-p (the order HF and vLLM use).

    logits [B, R, V] float -> probs [B, R, V] float32. Rows with temperature 0 get a one-hot at the
    argmax of the raw logits (greedy). Top-k and top-p are renormalised after each cut, as in HF.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    temperature = sampling.temperature.float().view(-1, 1, 1)  # [B, 1, 1]
    greedy = temperature <= 0  # [B, 1, 1]
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)  # [B, R, V]

    # Per-row top-k / top-p need the tokens in descending order. A full-vocabulary sort is slow to
    # compile on Neuron; a later kernel replaces it.
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)  # [B, R, V]
    rank = torch.arange(vocab, device=logits.device).view(1, 1, vocab)
    top_k = sampling.top_k.view(-1, 1, 1)  # [B, 1, 1]
    keep = (top_k <= 0) | (rank < top_k)  # [B, R, V], a prefix of the sorted order
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # Top-p keeps the smallest prefix whose mass reaches p: a token stays while the mass before it is
    # below p. top_p >= 1 must keep every token explicitly: the rounded mass before a tiny tail token
    # can equal 1.0. The top token always stays, so no row is ever left empty.
    top_p = sampling.top_p.float().view(-1, 1, 1)  # [B, 1, 1]
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = keep & ((mass_before < top_p) | (top_p >= 1) | (rank == 0))

    # Cut at the smallest kept logit rather than scattering the sorted mask back: equal logits then
    # share one fate, so the result does not depend on how a backend's sort orders ties.
    num_kept = keep.sum(-1, keepdim=True)  # [B, R, 1], >= 1
    cutoff = sorted_logits.gather(-1, num_kept - 1)  # [B, R, 1]
    probs = torch.softmax(scaled.masked_fill(scaled < cutoff, float("-inf")), dim=-1)

    one_hot = (rank == logits.argmax(-1, keepdim=True)).float()  # [B, R, V]
    return torch.where(greedy, one_hot, probs)


def sample_from_probs(probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling. probs [B, R, V] (need not be normalised), uniform [B, R] in [0, 1)
    -> token ids [B, R] int64.

    The index is the number of entries whose cumulative mass is <= u * total, i.e. the first entry
    whose cumulative mass strictly exceeds it: a token of zero probability never does, so it is never
    chosen, and a one-hot row always gives its hot index.
    """
    cdf = probs.cumsum(-1)  # [B, R, V]
    total = cdf[..., -1:]  # [B, R, 1]
    threshold = uniform.unsqueeze(-1) * total  # [B, R, 1]
    # Entries whose cdf already equals the total are never counted: that caps the index at V-1 and at
    # the last token with positive mass even if u * total rounds up to the total (a backend computing
    # in lower precision, or u rounded to 1.0 on its way in).
    return ((cdf <= threshold) & (cdf < total)).sum(-1)


def sample_tokens(logits: Tensor, sampling: SamplingTensors, uniform: Tensor) -> Tensor:
    """logits [B, R, V], uniform [B, R] in [0, 1) -> token ids [B, R] int64."""
    return sample_from_probs(target_probs(logits, sampling), uniform)


def next_tokens(logits: Tensor, greedy: bool, sampling: SamplingTensors, uniform: Tensor) -> Tensor:
    """The token after one position per row, as the prefill and decode graphs pick it: logits [B, 1, V],
    uniform [B, 1] -> [B] int64, the argmax in a greedy graph (which traces no softmax) or sampled."""
    if greedy:
        return logits[:, 0].argmax(-1)
    return sample_tokens(logits, sampling, uniform)[:, 0]


def _commit(draft_tokens: Tensor, accepted: Tensor, final_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """draft_tokens [B, K], accepted [B, K] bool, final_tokens [B, K+1] (the token to emit if the run
    of accepts ends at that position) -> (tokens [B, K+1] int64 padded, counts [B] int64)."""
    num_speculative_tokens = draft_tokens.shape[1]
    # Leading accepts = positions with no rejection at or before them. A cumsum of the rejections
    # rather than a cumprod of the accepts: torch-xla runs cumprod on the host.
    num_accepted = ((~accepted).long().cumsum(dim=1) == 0).sum(dim=1)  # [B]
    n = num_accepted.unsqueeze(1)  # [B, 1]
    position = torch.arange(num_speculative_tokens + 1, device=draft_tokens.device).unsqueeze(0)  # [1, K+1]
    # Position K is never < n, so the value padding the drafts there is never used.
    drafts = torch.cat([draft_tokens.long(), final_tokens[:, :1].long()], dim=1)  # [B, K+1] (K may be 0)
    final = final_tokens.long().gather(1, n)  # [B, 1]
    pad = torch.full_like(drafts, PAD_TOKEN)
    tokens = torch.where(position < n, drafts, torch.where(position == n, final, pad))
    return tokens, num_accepted + 1


def greedy_accept(draft_tokens: Tensor, target_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Longest matching prefix. draft_tokens [B, K], target_tokens [B, K+1] (target argmax at each
    verify position) -> (tokens [B, K+1] int64 padded with -1, counts [B] int64 in 1..K+1).

    With n leading drafts equal to the target's choices, the committed tokens are
    target_tokens[:, :n+1]: the n accepted drafts and the target's own token after them.
    """
    accepted = draft_tokens == target_tokens[:, :-1]  # [B, K]
    return _commit(draft_tokens, accepted, target_tokens)


def rejection_accept(draft_tokens: Tensor, target_probs: Tensor, accept_uniform: Tensor,
                     sample_uniform: Tensor, draft_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling (see the module docstring).

    draft_tokens [B, K]; target_probs [B, K+1, V], already processed by `target_probs()`;
    accept_uniform [B, K] and sample_uniform [B, K+1] in [0, 1); draft_probs [B, K, V], or None when
    the drafts were chosen greedily (q one-hot at the draft token).
    -> (tokens [B, K+1] int64: d_0..d_{n-1}, the recovered or bonus token, then -1s; counts [B] = n+1).

    Rows whose target_probs are one-hot (greedy rows) give exactly `greedy_accept`'s result.
    """
    num_speculative_tokens = draft_tokens.shape[1]
    vocab = target_probs.shape[-1]
    p = target_probs.float()  # [B, K+1, V]
    if draft_probs is None:
        vocab_ids = torch.arange(vocab, device=draft_tokens.device)
        q = (draft_tokens.unsqueeze(-1) == vocab_ids).float()  # [B, K, V]
    else:
        q = draft_probs.float()  # [B, K, V]
    index = draft_tokens.long().unsqueeze(-1)  # [B, K, 1]
    p_draft = p[:, :num_speculative_tokens].gather(-1, index).squeeze(-1)  # [B, K]
    q_draft = q.gather(-1, index).squeeze(-1)  # [B, K]
    # u < min(1, p/q) without dividing (q may be 0 for a draft token a caller forced).
    accepted = accept_uniform.float() * q_draft < p_draft  # [B, K]

    # Residuals for every position at once, selected afterwards; the bonus position's "residual" is
    # p_K itself (nothing to subtract).
    q_full = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # [B, K+1, V]
    residual = (p - q_full).clamp(min=0)  # [B, K+1, V]
    # In exact arithmetic a rejection implies p(d) < q(d), so the residual has positive mass; rounding
    # can still empty it (and positions before the first rejection are unused): fall back to p.
    mass = residual.sum(-1, keepdim=True)  # [B, K+1, 1]
    residual = torch.where(mass > 0, residual, p)
    final_tokens = sample_from_probs(residual, sample_uniform)  # [B, K+1]
    return _commit(draft_tokens, accepted, final_tokens)


class HostRandom:
    """Seeded per-row host RNG producing the uniforms the graphs take.

    Row i's uniforms come from its own generator, so a seeded request draws the same stream whatever
    batch it lands in and whatever the other rows' seeds are.
    """

    def __init__(self, seeds: list[int | None]) -> None:
        """One seed per row; None draws a nondeterministic seed for that row."""
        self.generators: list[torch.Generator] = [torch.Generator() for _ in seeds]
        for row, seed in enumerate(seeds):
            self.reseed(row, seed)

    def reseed(self, row: int, seed: int | None) -> None:
        """Row `row` starts a new stream (a request entering that slot), seeded as in __init__."""
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        self.generators[row] = generator

    def uniform_row(self, row: int, count: int) -> Tensor:
        """-> [1, count] float32 in [0, 1) from row `row`'s generator alone."""
        return torch.rand(count, generator=self.generators[row], dtype=torch.float32).unsqueeze(0)

    def uniform(self, per_row: int) -> Tensor:
        """-> [B, per_row] float32 in [0, 1), row i from generator i."""
        return torch.stack([torch.rand(per_row, generator=g, dtype=torch.float32) for g in self.generators])
