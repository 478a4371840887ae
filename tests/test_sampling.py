"""Sampling and speculative acceptance (neuron_peagle.sampling).

Exact tables for the greedy prefix rule; the lossless rule reduces to it on one-hot targets; the
processed distribution (temperature, top-k, top-p) against a plain per-row reference; statistical
tests that rejection sampling reproduces the target distribution (the emitted histogram converges to
p as the sample count grows, and is far closer to p than random distributions are); seeded
determinism; and the acceptance functions traced by torch-xla give eager's results.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from neuron_peagle.errors import ConfigError
from neuron_peagle.sampling import (HostRandom, SamplingTensors, greedy_accept, rejection_accept,
                                    sample_from_probs, sample_tokens, target_probs)

PAD = -1


def sampling_tensors(batch_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
                     ) -> SamplingTensors:
    """The same settings for every one of `batch_size` rows."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    return SamplingTensors(
        temperature=torch.full((batch_size,), float(temperature), dtype=torch.float32),
        top_k=torch.full((batch_size,), int(top_k), dtype=torch.int64),
        top_p=torch.full((batch_size,), float(top_p), dtype=torch.float32),
    )


def one_hot_probs(tokens: Tensor, vocab: int) -> Tensor:  # [B, R] -> [B, R, V] float32
    return torch.nn.functional.one_hot(tokens, vocab).float()


# --- greedy acceptance: exact tables ----------------------------------------------------------------

# (draft_tokens [K], target_tokens [K+1], committed tokens [K+1], count)
GREEDY_TABLE = {
    "all_rejected": ([5, 6, 7, 8], [1, 2, 3, 4, 9], [1, PAD, PAD, PAD, PAD], 1),
    "all_accepted": ([1, 2, 3, 4], [1, 2, 3, 4, 9], [1, 2, 3, 4, 9], 5),
    "mismatch_in_middle": ([1, 2, 7, 4], [1, 2, 3, 4, 9], [1, 2, 3, PAD, PAD], 3),
    "later_match_not_accepted": ([1, 7, 3, 4], [1, 2, 3, 4, 9], [1, 2, PAD, PAD, PAD], 2),
    "mismatch_at_last_draft": ([1, 2, 3, 7], [1, 2, 3, 4, 9], [1, 2, 3, 4, PAD], 4),
    "first_rejected_rest_match": ([0, 2, 3, 4], [1, 2, 3, 4, 9], [1, PAD, PAD, PAD, PAD], 1),
    "k1_accepted": ([3], [3, 8], [3, 8], 2),
    "k1_rejected": ([4], [3, 8], [3, PAD], 1),
}


@pytest.mark.parametrize("case", sorted(GREEDY_TABLE))
def test_greedy_accept_table(case):
    draft, target, want_tokens, want_count = GREEDY_TABLE[case]
    tokens, counts = greedy_accept(torch.tensor([draft]), torch.tensor([target]))
    assert tokens.dtype == torch.int64 and counts.dtype == torch.int64
    assert tokens.tolist() == [want_tokens]
    assert counts.tolist() == [want_count]


@pytest.mark.parametrize("case", sorted(GREEDY_TABLE))
def test_rejection_accept_on_one_hot_targets_follows_greedy_table(case):
    draft, target, want_tokens, want_count = GREEDY_TABLE[case]
    k = len(draft)
    generator = torch.Generator().manual_seed(0)
    tokens, counts = rejection_accept(torch.tensor([draft]), one_hot_probs(torch.tensor([target]), 10),
                                      torch.rand(1, k, generator=generator),
                                      torch.rand(1, k + 1, generator=generator))
    assert tokens.tolist() == [want_tokens]
    assert counts.tolist() == [want_count]


def test_greedy_accept_batch_rows_have_independent_outcomes():
    cases = [GREEDY_TABLE[name] for name in sorted(GREEDY_TABLE) if len(GREEDY_TABLE[name][0]) == 4]
    drafts = torch.tensor([c[0] for c in cases])
    targets = torch.tensor([c[1] for c in cases])
    tokens, counts = greedy_accept(drafts, targets)
    assert tokens.tolist() == [c[2] for c in cases]
    assert counts.tolist() == [c[3] for c in cases]
    assert len(set(counts.tolist())) == 5  # every count 1..K+1 occurs in this one batch


unit_floats = st.floats(0.0, 1.0, exclude_max=True, width=32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 4), k=st.integers(1, 6), vocab=st.integers(2, 12),
       with_draft_probs=st.booleans())
def test_rejection_accept_with_one_hot_targets_equals_greedy_accept(data, batch, k, vocab, with_draft_probs):
    token = st.integers(0, vocab - 1)
    targets = torch.tensor(data.draw(st.lists(st.lists(token, min_size=k + 1, max_size=k + 1),
                                              min_size=batch, max_size=batch)))
    # Drafts mostly copy the target so long accepted runs (and all-accepted rows) are common.
    copy = torch.tensor(data.draw(st.lists(st.lists(st.booleans() | st.just(True), min_size=k, max_size=k),
                                           min_size=batch, max_size=batch)))
    other = torch.tensor(data.draw(st.lists(st.lists(token, min_size=k, max_size=k),
                                            min_size=batch, max_size=batch)))
    drafts = torch.where(copy, targets[:, :k], other)
    accept_uniform = torch.tensor(data.draw(st.lists(st.lists(unit_floats, min_size=k, max_size=k),
                                                     min_size=batch, max_size=batch)))
    sample_uniform = torch.tensor(data.draw(st.lists(st.lists(unit_floats, min_size=k + 1, max_size=k + 1),
                                                     min_size=batch, max_size=batch)))
    draft_probs = None
    if with_draft_probs:  # any q, as long as the draft tokens could have been drawn from it
        logits = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=batch * k * vocab,
                                                 max_size=batch * k * vocab))).view(batch, k, vocab)
        draft_probs = torch.softmax(logits, -1)

    want = greedy_accept(drafts, targets)
    got = rejection_accept(drafts, one_hot_probs(targets, vocab), accept_uniform, sample_uniform, draft_probs)
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tolist() == want[1].tolist()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), k=st.integers(1, 6), vocab=st.integers(2, 12),
       greedy_drafts=st.booleans())
def test_rejection_accept_output_structure(seed, batch, k, vocab, greedy_drafts):
    generator = torch.Generator().manual_seed(seed)
    # Sparse-ish targets so zero-probability drafts and rejections are frequent.
    p = torch.softmax(3 * torch.randn(batch, k + 1, vocab, generator=generator), -1)
    p = p * (torch.rand(batch, k + 1, vocab, generator=generator) < 0.6)
    p[..., 0] += 1e-3
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(2 * torch.randn(batch, k, vocab, generator=generator), -1)
    drafts = torch.multinomial(q.view(-1, vocab), 1, generator=generator).view(batch, k)
    tokens, counts = rejection_accept(drafts, p, torch.rand(batch, k, generator=generator),
                                      torch.rand(batch, k + 1, generator=generator),
                                      None if greedy_drafts else q)
    assert tokens.shape == (batch, k + 1) and counts.shape == (batch,)
    for row in range(batch):
        n = int(counts[row]) - 1
        assert 0 <= n <= k
        assert tokens[row, :n].tolist() == drafts[row, :n].tolist()
        assert (tokens[row, n + 1:] == PAD).all()
        emitted = int(tokens[row, n])
        assert p[row, n, emitted] > 0  # recovered and bonus tokens come from p's support
        if greedy_drafts and n < k:
            assert emitted != int(drafts[row, n])  # the rejected draft is removed from the residual


def test_rejection_with_empty_residual_falls_back_to_target():
    # q >= p everywhere leaves max(0, p - q) all zero; a rejection can then only come from a draft
    # outside q's support (or from rounding). The recovered token must still come from p.
    p = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    tokens, counts = rejection_accept(torch.tensor([[3]]), p, torch.tensor([[0.5]]), torch.tensor([[0.1, 0.1]]),
                                      draft_probs=p[:, :1])
    assert counts.tolist() == [1]
    assert tokens.tolist() == [[1, PAD]]


# --- processed target distribution ---------------------------------------------------------------

def reference_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """One row, written the plain way: logits [V] -> probs [V] float64."""
    logits = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).double()
    order = torch.argsort(logits / temperature, descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    weights = torch.softmax(logits[kept] / temperature, 0)
    if top_p < 1:
        mass, size = 0.0, 0
        while mass < top_p:
            mass += float(weights[size])
            size += 1
        kept = kept[:size]
        weights = torch.softmax(logits[kept] / temperature, 0)
    probs = torch.zeros(logits.numel(), dtype=torch.float64)
    probs[kept] = weights
    return probs


def test_temperature_scales_logits():
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.5, 1.0, 2.5])
    probs = target_probs(logits, SamplingTensors(temperature, torch.zeros(3, dtype=torch.int64), torch.ones(3)))
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    torch.testing.assert_close(probs, torch.softmax(logits / temperature.view(-1, 1, 1), -1))
    assert not torch.allclose(probs[0], probs[2], atol=1e-3)


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(2))
    top_k = torch.tensor([1, 3, 10, 50])
    probs = target_probs(logits, SamplingTensors(torch.ones(4), top_k, torch.ones(4)))
    assert (probs > 0).sum(-1).tolist() == [[k] * 3 for k in top_k.tolist()]
    for row, k in enumerate(top_k.tolist()):
        kept = logits[row].topk(k, dim=-1).indices
        assert (probs[row].gather(-1, kept) > 0).all()
        want = torch.softmax(logits[row].gather(-1, kept), -1)
        torch.testing.assert_close(probs[row].gather(-1, kept), want)


@pytest.mark.parametrize("top_p, want", [
    (0.4, [0.0, 1.0, 0.0, 0.0]),  # the top token alone reaches 0.4
    (0.75, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),  # 0.5 < 0.75 <= 0.5 + 0.3
    (0.85, [0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),
    (1.0, [0.05, 0.5, 0.15, 0.3]),
])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, want):
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().view(1, 1, 4)
    probs = target_probs(logits, sampling_tensors(1, temperature=1.0, top_p=top_p))
    torch.testing.assert_close(probs.view(-1), torch.tensor(want))


def test_top_p_of_one_keeps_tokens_too_small_to_change_the_cumulative_mass():
    logits = torch.zeros(1, 1, 16)
    logits[..., 3] = 40.0  # the other tokens have mass ~4e-18, below float32 resolution near 1
    probs = target_probs(logits, sampling_tensors(1, temperature=1.0, top_p=1.0))
    assert (probs > 0).all()
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_tiny_top_p_keeps_the_top_token():
    logits = torch.randn(2, 3, 30, generator=torch.Generator().manual_seed(3))
    probs = target_probs(logits, sampling_tensors(2, temperature=1.0, top_p=1e-9))
    torch.testing.assert_close(probs, one_hot_probs(logits.argmax(-1), 30))


def test_greedy_rows_are_one_hot_at_argmax_whatever_top_k_and_top_p():
    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(4))
    sampling = SamplingTensors(torch.zeros(2), torch.tensor([0, 3]), torch.tensor([1.0, 0.2]))
    probs = target_probs(logits, sampling)
    assert torch.equal(probs, one_hot_probs(logits.argmax(-1), 40))


ROW_SETTINGS = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 3, 0.5), (0.5, 20, 0.9), (2.0, 0, 1.0)]


def test_mixed_rows_each_match_the_reference():
    logits = 2 * torch.randn(len(ROW_SETTINGS), 3, 64, generator=torch.Generator().manual_seed(5))
    sampling = SamplingTensors(torch.tensor([s[0] for s in ROW_SETTINGS]),
                               torch.tensor([s[1] for s in ROW_SETTINGS]),
                               torch.tensor([s[2] for s in ROW_SETTINGS]))
    probs = target_probs(logits, sampling)
    for row, (temperature, top_k, top_p) in enumerate(ROW_SETTINGS):
        alone = target_probs(logits[row:row + 1], sampling_tensors(1, temperature, top_k, top_p))
        assert torch.equal(probs[row:row + 1], alone)
        for position in range(3):
            want = reference_probs(logits[row, position], temperature, top_k, top_p)
            torch.testing.assert_close(probs[row, position].double(), want, atol=1e-6, rtol=1e-5)


def test_random_settings_match_the_reference():
    generator = torch.Generator().manual_seed(6)
    for _ in range(40):
        vocab = int(torch.randint(2, 100, (1,), generator=generator))
        temperature = float(torch.rand(1, generator=generator)) * 2 + 0.05
        top_k = int(torch.randint(0, vocab + 2, (1,), generator=generator))
        top_p = float(torch.rand(1, generator=generator)) * 0.98 + 0.01
        logits = 3 * torch.randn(1, 1, vocab, generator=generator)
        probs = target_probs(logits, sampling_tensors(1, temperature, top_k, top_p))
        want = reference_probs(logits[0, 0], temperature, top_k, top_p)
        assert ((probs[0, 0] > 0) == (want > 0)).all()
        torch.testing.assert_close(probs[0, 0].double(), want, atol=1e-6, rtol=1e-5)


def test_sampling_tensors_validates_and_broadcasts():
    s = sampling_tensors(3, temperature=0.5, top_k=7, top_p=0.9)
    assert s.temperature.tolist() == [0.5] * 3 and s.top_k.tolist() == [7] * 3
    assert (s.temperature.dtype, s.top_k.dtype, s.top_p.dtype) == (torch.float32, torch.int64, torch.float32)
    for bad in (dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            sampling_tensors(2, **bad)


# --- inverse-CDF sampling ------------------------------------------------------------------------

def histogram(tokens: Tensor, vocab: int) -> Tensor:  # [N] -> [V] float64 frequencies
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def tv_distance(a: Tensor, b: Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def expected_tv_bound(p: Tensor, samples: int) -> float:
    """Upper bound on the expected TV distance between p and an n-sample histogram (Jensen)."""
    p = p.double()
    return 0.5 * float((p * (1 - p) / samples).sqrt().sum())


def test_sample_from_probs_never_picks_zero_probability_tokens():
    generator = torch.Generator().manual_seed(7)
    probs = torch.rand(64, 8, 16, generator=generator) * (torch.rand(64, 8, 16, generator=generator) < 0.3)
    probs[..., 5] += 1e-6  # no all-zero rows
    probs[:, :, 0] = 0  # leading and trailing zeros
    probs[:, :, -1] = 0
    uniform = torch.rand(64, 8, generator=generator)
    uniform[:, 0] = 0.0
    uniform[:, 1] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))  # the largest u below 1
    tokens = sample_from_probs(probs, uniform)
    assert tokens.dtype == torch.int64 and tokens.shape == (64, 8)
    assert (probs.gather(-1, tokens.unsqueeze(-1)) > 0).all()
    # Unnormalised input is sampled as its normalisation (scaling by 4 is exact in float).
    assert torch.equal(sample_from_probs(4 * probs, uniform), tokens)


def test_sample_from_probs_stays_in_support_even_if_u_rounds_up_to_one():
    for dtype in (torch.float32, torch.bfloat16):
        probs = torch.tensor([[[0.25, 0.75, 0.0, 0.0]]], dtype=dtype)
        assert sample_from_probs(probs, torch.ones(1, 1)).tolist() == [[1]]


def test_sample_from_probs_one_hot_rows_give_the_hot_index():
    hot = torch.tensor([[0, 7, 15]]).expand(50, 3)
    uniform = torch.linspace(0, 1, 51)[:-1].unsqueeze(1).expand(50, 3)
    assert torch.equal(sample_from_probs(one_hot_probs(hot, 16), uniform), hot)


def test_sample_from_probs_matches_distribution():
    generator = torch.Generator().manual_seed(8)
    p = torch.softmax(2 * torch.randn(12, generator=generator), -1) * (torch.arange(12) % 4 != 1)
    p = p / p.sum()
    samples = 200_000
    tokens = sample_from_probs(p.expand(samples, 1, 12), torch.rand(samples, 1, generator=generator))[:, 0]
    frequencies = histogram(tokens, 12)
    assert (frequencies[p == 0] == 0).all()
    assert tv_distance(frequencies, p) < 3 * expected_tv_bound(p, samples)


# --- losslessness: the emitted tokens are distributed as p --------------------------------------

SAMPLE_COUNTS = (1_000, 10_000, 100_000)


def random_distributions(count: int, vocab: int, generator: torch.Generator) -> Tensor:  # -> [count, V]
    return torch.softmax(1.5 * torch.randn(count, vocab, generator=generator), -1)


def run_speculation(p: Tensor, q: Tensor, greedy_drafts: bool, samples: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor]:
    """p [K+1, V], q [K, V], the same context for every sample -> (tokens [N, K+1], counts [N])."""
    k, vocab = q.shape
    if greedy_drafts:
        drafts = q.argmax(-1).expand(samples, k)
    else:
        drafts = torch.multinomial(q, samples, replacement=True, generator=generator).T  # [N, K], d_j ~ q_j
    return rejection_accept(drafts, p.expand(samples, k + 1, vocab), torch.rand(samples, k, generator=generator),
                            torch.rand(samples, k + 1, generator=generator),
                            None if greedy_drafts else q.expand(samples, k, vocab))


def assert_converges_to(tokens: Tensor, p: Tensor, generator: torch.Generator) -> None:
    """tokens [N] drawn independently: their histogram approaches p as the sample count grows, and
    ends much closer to p than independent random distributions are.

    The distance at n samples is averaged over the disjoint n-sample chunks of `tokens` (100 chunks
    of 1k, 10 of 10k, 1 of 100k), so the shrinking is not at the mercy of one lucky small chunk.
    """
    vocab = p.numel()
    distances = []
    for samples in SAMPLE_COUNTS:
        chunks = tokens[: tokens.numel() // samples * samples].view(-1, samples)
        assert chunks.shape[0] >= 1
        distance = sum(tv_distance(histogram(chunk, vocab), p) for chunk in chunks) / chunks.shape[0]
        assert distance < 3 * expected_tv_bound(p, samples), (samples, distance)
        distances.append(distance)
    assert distances == sorted(distances, reverse=True), distances
    references = random_distributions(20, vocab, generator)
    nearest_reference = min(tv_distance(r, p) for r in references)
    assert distances[-1] < nearest_reference / 10, (distances[-1], nearest_reference)


@pytest.mark.parametrize("greedy_drafts", [False, True], ids=["sampled_drafts", "greedy_drafts"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("vocab", [8, 32])
def test_first_emitted_token_is_distributed_as_target(vocab, k, greedy_drafts):
    generator = torch.Generator().manual_seed(100 * vocab + 10 * k + greedy_drafts)
    p = random_distributions(k + 1, vocab, generator)
    # A drafter that roughly tracks the target, so both long accepted runs and rejections occur.
    q = torch.softmax(p.log()[:k] + torch.randn(k, vocab, generator=generator), -1)
    tokens, counts = run_speculation(p, q, greedy_drafts, SAMPLE_COUNTS[-1], generator)
    assert_converges_to(tokens[:, 0], p[0], generator)

    # Control: the drafts alone are measurably off p, so the test can tell the two apart.
    if not greedy_drafts:
        drafts = torch.multinomial(q[0], SAMPLE_COUNTS[-1], replacement=True, generator=generator)
        assert tv_distance(histogram(drafts, vocab), p[0]) > 10 * expected_tv_bound(p[0], SAMPLE_COUNTS[-1])
    assert (counts == 1).any() and (counts == k + 1).any()


@pytest.mark.parametrize("greedy_drafts", [False, True], ids=["sampled_drafts", "greedy_drafts"])
def test_later_and_bonus_tokens_are_distributed_as_target(greedy_drafts):
    # With a context-free target, token j of a step (given the step reached it) must follow p_j.
    vocab, k = 16, 3
    generator = torch.Generator().manual_seed(11 + greedy_drafts)
    p = random_distributions(k + 1, vocab, generator)
    p[:k] = torch.softmax(3 * p[:k].log(), -1)  # peaky early positions so many steps reach the bonus
    q = torch.softmax(p.log()[:k] + 0.5 * torch.randn(k, vocab, generator=generator), -1)
    # The bonus distribution overlaps the last draft's, so drawing the bonus from a residual
    # (p_K - q_{K-1}) instead of p_K itself would be far off.
    p[k] = 0.5 * p[k] + 0.5 * q[k - 1]
    tokens, counts = run_speculation(p, q, greedy_drafts, 200_000, generator)
    for position in (1, k):
        reached = tokens[counts > position, position]
        assert reached.numel() >= 10_000
        assert tv_distance(histogram(reached, vocab), p[position]) < 3 * expected_tv_bound(p[position], reached.numel())


def test_processed_target_distribution_is_reproduced():
    vocab, k, samples = 32, 2, 100_000
    generator = torch.Generator().manual_seed(12)
    settings_ = sampling_tensors(1, temperature=0.8, top_k=6, top_p=0.8)
    target_logits = 2 * torch.randn(1, k + 1, vocab, generator=generator)
    draft_logits = target_logits[:, :k] + torch.randn(1, k, vocab, generator=generator)
    p = target_probs(target_logits, settings_)[0]  # [K+1, V]
    q = target_probs(draft_logits, settings_)[0]  # [K, V]
    assert 1 < int((p[0] > 0).sum()) <= 6

    tokens, _ = run_speculation(p, q, False, samples, generator)
    frequencies = histogram(tokens[:, 0], vocab)
    assert (frequencies[p[0] == 0] == 0).all()  # nothing outside the top-k / top-p support
    assert_converges_to(tokens[:, 0], p[0], generator)
    unprocessed = torch.softmax(target_logits[0, 0], -1)
    assert tv_distance(frequencies, unprocessed) > 10 * expected_tv_bound(p[0], samples)

    # Plain sampling from the same logits follows the same processed distribution.
    plain = sample_tokens(target_logits[:, :1].expand(samples, 1, vocab), sampling_tensors(samples, 0.8, 6, 0.8),
                          torch.rand(samples, 1, generator=generator))[:, 0]
    assert_converges_to(plain, p[0], generator)


# --- seeded host randomness ----------------------------------------------------------------------

def seeded_tokens(seeds: list[int | None], logits: Tensor, steps: int = 4) -> Tensor:
    """logits [B, K+1, V] -> tokens [steps, B, K+1] from rejection sampling fed by HostRandom(seeds)."""
    batch, positions, vocab = logits.shape
    k = positions - 1
    probs = target_probs(logits, sampling_tensors(batch, temperature=1.0))
    q = torch.softmax(logits[:, :k] * 0.5, -1)
    random = HostRandom(seeds)
    out = []
    for _ in range(steps):
        uniform = random.uniform(3 * k + 1)  # [B, 3K+1]: drafts, accepts, samples
        drafts = sample_from_probs(q, uniform[:, :k])
        tokens, _ = rejection_accept(drafts, probs, uniform[:, k:2 * k], uniform[:, 2 * k:], q)
        out.append(tokens)
    return torch.stack(out)


def test_host_random_same_seeds_same_uniforms():
    a, b = HostRandom([1, 2, 3]), HostRandom([1, 2, 3])
    first = a.uniform(5)
    assert first.shape == (3, 5) and first.dtype == torch.float32
    assert ((first >= 0) & (first < 1)).all()
    assert torch.equal(first, b.uniform(5))
    assert torch.equal(a.uniform(2), b.uniform(2))  # streams stay in step across calls
    assert not torch.equal(first[0], first[1])  # different seeds, different streams


def test_host_random_row_stream_is_independent_of_other_rows():
    alone = HostRandom([7])
    in_batch = HostRandom([3, 7, None])
    other_batch = HostRandom([7, 123])
    for per_row in (4, 1, 9):
        want = alone.uniform(per_row)[0]
        assert torch.equal(in_batch.uniform(per_row)[1], want)
        assert torch.equal(other_batch.uniform(per_row)[0], want)


def test_unseeded_rows_differ():
    assert not torch.equal(HostRandom([None]).uniform(8), HostRandom([None]).uniform(8))


def test_seeded_tokens_are_reproducible_and_batch_independent():
    logits = torch.randn(3, 4, 200, generator=torch.Generator().manual_seed(13))
    first = seeded_tokens([5, 6, 7], logits)
    assert torch.equal(first, seeded_tokens([5, 6, 7], logits))
    # Row 1 keeps seed 6 while its neighbours change: its tokens do not move.
    moved = seeded_tokens([50, 6, None], logits)
    assert torch.equal(moved[:, 1], first[:, 1])
    assert not torch.equal(moved[:, 0], first[:, 0])
    assert not torch.equal(seeded_tokens([8, 9, 10], logits), first)


# --- traced by torch-xla -------------------------------------------------------------------------

def accept_step(logits: Tensor, sampling: SamplingTensors, drafts: Tensor, accept_uniform: Tensor,
                sample_uniform: Tensor, draft_probs: Tensor | None) -> tuple[Tensor, ...]:
    probs = target_probs(logits, sampling)
    tokens, counts = rejection_accept(drafts, probs, accept_uniform, sample_uniform, draft_probs)
    greedy_tokens, greedy_counts = greedy_accept(drafts, logits.argmax(-1))
    sampled = sample_tokens(logits, sampling, sample_uniform)
    return probs, tokens, counts, greedy_tokens, greedy_counts, sampled


def accept_inputs(seed: int, batch: int = 4, k: int = 3, vocab: int = 50) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, k + 1, vocab, generator=generator)
    sampling = SamplingTensors(torch.tensor([0.0, 0.7, 1.0, 1.5]), torch.tensor([0, 10, 0, 5]),
                               torch.tensor([1.0, 0.9, 0.7, 1.0]))
    drafts = logits[:, :k].argmax(-1)
    drafts[:, 1:] = torch.where(torch.rand(batch, k - 1, generator=generator) < 0.5, drafts[:, 1:],
                                torch.randint(0, vocab, (batch, k - 1), generator=generator))
    draft_probs = torch.softmax(logits[:, :k] + torch.randn(batch, k, vocab, generator=generator), -1)
    return (logits, sampling, drafts, torch.rand(batch, k, generator=generator),
            torch.rand(batch, k + 1, generator=generator), draft_probs)


@pytest.mark.xla
def test_acceptance_traces_with_fixed_shapes_on_xla_and_equals_eager():
    import torch_xla
    import torch_xla.debug.metrics as metrics

    device = torch_xla.device()

    def on_xla(inputs: tuple, with_draft_probs: bool) -> list[Tensor]:
        moved = [x.to(device) if isinstance(x, Tensor) else SamplingTensors(*(t.to(device) for t in x))
                 for x in inputs]
        if not with_draft_probs:
            moved[-1] = None
        outputs = accept_step(*moved)
        torch_xla.sync()
        return [o.cpu() for o in outputs]

    def compiles() -> int:
        return int(metrics.counter_value("UncachedCompile") or 0)

    metrics.clear_counters()
    for seed in (0, 1):  # same shapes, new values: the second round must reuse the graphs
        start = compiles()
        for with_draft_probs in (False, True):
            inputs = accept_inputs(seed)
            eager = accept_step(*inputs[:-1], inputs[-1] if with_draft_probs else None)
            traced = on_xla(inputs, with_draft_probs)
            torch.testing.assert_close(traced[0], eager[0])
            for got, want in zip(traced[1:], eager[1:]):
                assert torch.equal(got, want)
        if seed == 0:
            assert compiles() > start
        else:
            assert compiles() == start
    assert metrics.executed_fallback_ops() == []  # every op lowered to XLA, none ran on the host
