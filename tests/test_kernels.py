"""The NKI kernels: each matches its PyTorch reference (run through the CPU interpreter, or through
`nki.simulate` where the Neuron SDK is installed), the interpreter refuses what the hardware
refuses, and the speculative step gives the same tokens with the kernels as the code before them."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron_peagle.config import BuildConfig, DrafterConfig
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.graphs.proposers import DrafterProposer
from neuron_peagle.graphs.spec_state import SpecState
from neuron_peagle.graphs.speculative import (SpecPrefillGraph, SpecPrefillInputs, SpecStepGraph, SpecStepInputs,
                                              SpecStepOutputs)
from neuron_peagle.kernels import (DraftInputParams, check_kernel_mode, draft_input_call, draft_input_reference,
                                   interpreter, lm_head_argmax_call)
from neuron_peagle.kernels.interpreter import NkiInterpreterError
from neuron_peagle.kernels.lm_head import lm_head_argmax_reference
from neuron_peagle.kernels.nki_api import HAVE_NKI
from neuron_peagle.models.layers import RMSNorm
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.drafter_choice import random_drafter
from neuron_peagle.runtime.engine import SamplingParams
from neuron_peagle.sampling import greedy_accept
from spec_helpers import make_engine

RTOL = 1e-5


def run_kernel(kernel, *args):
    """The kernel's own source: through nki.simulate where nki is installed, else the interpreter."""
    if HAVE_NKI:
        import ml_dtypes
        import nki

        def array(a):
            if a.dtype == torch.bfloat16:
                return a.float().numpy().astype(ml_dtypes.bfloat16)
            return a.numpy()

        return nki.simulate(nki.jit(kernel))(*(array(a) if isinstance(a, torch.Tensor) else a for a in args))
    return interpreter.run(kernel, *args)


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    got, want = np.asarray(got, dtype=np.float32), want.float().numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ---- kernel 2: LM head + argmax ---------------------------------------------------------------


def check_lm_head(rows: int, hidden: int, vocab: int, reduced: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    weight = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5  # [vocab, H], nn.Linear's
    d2t = torch.arange(vocab) * 3 if reduced else None  # draft id i -> target id 4 i
    want_ids, want_best = lm_head_argmax_reference(h, weight, d2t)
    kernel, args = lm_head_argmax_call(h, weight, d2t)
    ids, best = run_kernel(kernel, *args)
    ids = torch.from_numpy(ids[:, 0]).long()
    assert relative_error(best[:, 0], want_best) <= RTOL
    differ = ids != want_ids
    if differ.any():  # only where two logits tie up to float32 summation order
        draft_ids = ids // 4 if reduced else ids
        assert ((ids % 4 == 0).all() if reduced else True) and (draft_ids < vocab).all()
        theirs = (h @ weight.T).gather(1, draft_ids.unsqueeze(1)).squeeze(1)
        gap = (want_best - theirs)[differ]
        assert (gap.abs() <= RTOL * want_best[differ].abs()).all(), f"ids differ beyond a tie: {gap}"


@pytest.mark.parametrize("hidden", [96, 200, 576])
@pytest.mark.parametrize("vocab", [1000, 1537, 8192])
def test_lm_head_argmax_matches_reference(hidden, vocab):
    check_lm_head(rows=7, hidden=hidden, vocab=vocab, reduced=vocab == 8192, seed=hidden + vocab)


def test_lm_head_argmax_more_rows_than_partitions():
    check_lm_head(rows=130, hidden=130, vocab=700, reduced=True, seed=1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 140), hidden=st.integers(1, 300), vocab=st.integers(1, 2100), reduced=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lm_head_argmax_property(rows, hidden, vocab, reduced, seed):
    check_lm_head(rows, hidden, vocab, reduced, seed)


def test_ties_go_to_the_lowest_index_as_in_torch():
    # torch.argmax on CPU returns the first of equal maxima; the kernel must agree, inside a
    # 512-column tile and across tiles. Small integers make every logit exact, so ties are exact.
    assert int(torch.tensor([1.0, 3.0, 0.5, 3.0, 3.0]).argmax()) == 1
    g = torch.Generator().manual_seed(3)
    h = torch.randint(-2, 3, (6, 64), generator=g).float()
    weight = torch.randint(-1, 2, (1600, 64), generator=g).float()
    for column in (700, 650, 1599, 1100):  # tile 1 (twice), tile 3, tile 2: row 0's maximum
        weight[column] = 3 * h[0].sign()
    want, _ = lm_head_argmax_reference(h, weight)
    assert int(want[0]) == 650
    kernel, args = lm_head_argmax_call(h, weight, None)
    ids, _ = run_kernel(kernel, *args)
    assert torch.equal(torch.from_numpy(ids[:, 0]).long(), want)


# ---- kernel 1: drafter layer 0's input --------------------------------------------------------


def draft_params(hidden: int, target_hidden: int, norm_before_residual: bool, g: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> DraftInputParams:
    norms = []
    for _ in range(2):
        norm = RMSNorm(hidden, 1e-5)
        norm.weight.data = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
        norms.append(norm)
    fc = (torch.randn(hidden, 3 * target_hidden, generator=g) / (3 * target_hidden) ** 0.5).to(dtype)
    return DraftInputParams(fc, torch.randn(hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype),
                            norms[0], norms[1], norm_before_residual)


def check_draft_input(slots: int, hidden: int, target_hidden: int, norm_before_residual: bool, seed: int,
                      dtype: torch.dtype = torch.float32, rtol: float = RTOL) -> None:
    g = torch.Generator().manual_seed(seed)
    params = draft_params(hidden, target_hidden, norm_before_residual, g, dtype)
    embeds = torch.randn(1, slots, hidden, generator=g).to(dtype)
    features = torch.randn(1, slots, 3 * target_hidden, generator=g).to(dtype)
    is_mask = torch.rand(1, slots, generator=g) < 0.4
    want_x, want_residual = draft_input_reference(embeds, features, is_mask, params)
    kernel, args = draft_input_call(embeds, features, is_mask, params)
    x, residual = run_kernel(kernel, *args)
    assert x.shape == (slots, 2 * hidden) and residual.shape == (slots, hidden)
    assert relative_error(x, want_x[0].float()) <= rtol
    assert relative_error(residual, want_residual[0].float()) <= rtol
    if not norm_before_residual and dtype == torch.float32:  # mask slots take fc(mask_hidden) exactly
        mask_rows = residual[is_mask[0].numpy()]
        assert np.array_equal(mask_rows, np.broadcast_to(params.fc_mask_row.numpy(), mask_rows.shape))


@pytest.mark.parametrize("hidden", [96, 200, 576])
def test_draft_input_matches_reference(hidden):
    # 14 slots = 2K at K=7; target hidden 576 gives 3H_t = 1728, 13.5 contraction tiles.
    check_draft_input(slots=14, hidden=hidden, target_hidden=576, norm_before_residual=False, seed=hidden)
    check_draft_input(slots=14, hidden=hidden, target_hidden=64, norm_before_residual=True, seed=hidden + 1)


def test_draft_input_more_slots_than_partitions():
    check_draft_input(slots=150, hidden=130, target_hidden=50, norm_before_residual=False, seed=2)


def test_draft_input_bfloat16_is_close():
    check_draft_input(slots=14, hidden=200, target_hidden=100, norm_before_residual=False, seed=5,
                      dtype=torch.bfloat16, rtol=2e-2)


@settings(max_examples=25, deadline=None)
@given(slots=st.integers(1, 140), hidden=st.integers(8, 600), target_hidden=st.integers(1, 200),
       norm_before_residual=st.booleans(), seed=st.integers(0, 2**16))
def test_draft_input_property(slots, hidden, target_hidden, norm_before_residual, seed):
    # hidden >= 8: an RMSNorm over one or two values near zero is ill-conditioned (it amplifies the
    # fc's float32 summation-order differences by up to 1 / sqrt(eps)), whatever computes it.
    check_draft_input(slots, hidden, target_hidden, norm_before_residual, seed)


# ---- the interpreter refuses what the hardware refuses ----------------------------------------

nl, nisa = interpreter.nl, interpreter.nisa


def _matmul_kernel(stationary_shape, moving_shape, dst_shape):
    def kernel(a, b):
        st_tile = nl.ndarray(stationary_shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=st_tile, src=a)
        mv_tile = nl.ndarray(moving_shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=mv_tile, src=b)
        acc = nl.ndarray(dst_shape, dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=st_tile, moving=mv_tile)
        out_sb = nl.ndarray(dst_shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out_sb, src=acc)
        out = nl.ndarray(dst_shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=out_sb)
        return out

    return kernel


def _zeros(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_interpreter_computes_a_matmul():
    out = interpreter.run(_matmul_kernel((64, 8), (64, 16), (8, 16)), _zeros(64, 8), _zeros(64, 16))
    np.testing.assert_allclose(out, _zeros(64, 8).T @ _zeros(64, 16), rtol=1e-5)


@pytest.mark.parametrize("stationary, moving, dst, message", [
    ((64, 129), (64, 16), (8, 16), "stationary .* free size 129, more than 128"),
    ((64, 8), (64, 600), (8, 512), "moving .* has free size 600, more than 512"),
    ((64, 8), (32, 16), (8, 16), "contraction runs over the partitions, and they differ.*64.*32"),
    ((129, 8), (129, 16), (8, 16), "partition dimension .* must be 1..128"),
])
def test_interpreter_refuses_tile_limits(stationary, moving, dst, message):
    with pytest.raises(NkiInterpreterError, match=message):
        interpreter.run(_matmul_kernel(stationary, moving, dst), _zeros(*stationary), _zeros(*moving))


def test_interpreter_refuses_psum_tiles_over_one_bank():
    def kernel(a):
        nl.ndarray((8, 513), dtype=nl.float32, buffer=nl.psum)

    with pytest.raises(NkiInterpreterError, match=r"PSUM tile .* 2052 bytes per partition.*<= 512 float32"):
        interpreter.run(kernel, _zeros(1))


def test_interpreter_refuses_reading_unwritten_psum():
    def kernel(a):
        acc = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.psum, name="acc")
        a_sb = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_sb, src=a)
        # Only the first 8 columns get a matmul: the remainder tile was forgotten.
        nisa.nc_matmul(dst=acc[0:8, 0:8], stationary=a_sb, moving=a_sb)
        out = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out, src=acc)

    with pytest.raises(NkiInterpreterError, match=r"tensor_copy reads src acc\[...\] \(psum\) where it was never "
                                                  r"written \(64 of 128 elements, the first at \(0, 8\)\)"):
        interpreter.run(kernel, _zeros(4, 8))


def test_interpreter_refuses_compute_on_hbm_dma_from_psum_and_partial_outputs():
    def compute_on_hbm(a):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t, src=a)

    def dma_from_psum(a):
        p = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.psum)
        out = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=p)

    def partial_output(a):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a)
        out = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.shared_hbm, name="out")
        nisa.dma_copy(dst=out[0:4, 0:8], src=t)
        return out

    with pytest.raises(NkiInterpreterError, match="compute engines see only SBUF and PSUM"):
        interpreter.run(compute_on_hbm, _zeros(4, 8))
    with pytest.raises(NkiInterpreterError, match="DMA does not touch PSUM"):
        interpreter.run(dma_from_psum, _zeros(4, 8))
    with pytest.raises(NkiInterpreterError, match="output out was not fully written: 32 of 64"):
        interpreter.run(partial_output, _zeros(4, 8))


def test_interpreter_refuses_out_of_bounds_and_nested_slices():
    def out_of_bounds(a):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:4, 0:8], src=a[0:4, 4:12])

    def nested(a):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:4, 0:8][0:2], src=a[0:2, 0:8])

    with pytest.raises(NkiInterpreterError, match="slice 4:12 is empty or out of bounds for an axis of size 8"):
        interpreter.run(out_of_bounds, _zeros(4, 8))
    with pytest.raises(NkiInterpreterError, match="no nested slicing"):
        interpreter.run(nested, _zeros(4, 8))


def test_range_loops_carry_state_in_order():
    # A running sum carries its accumulator from one iteration to the next: a plain range loop (what NKI
    # compiles as a sequential loop) keeps the order; the deprecated nl.*_range names are range itself.
    def running_sum(a):
        acc = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
        for i in range(3):
            col = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=col, src=a[0:4, i:i + 1])
            if i == 0:
                nisa.tensor_copy(dst=acc, src=col)
            else:
                nisa.tensor_tensor(dst=acc, data1=acc, data2=col, op=nl.add)
        out = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=acc)
        return out

    a = _zeros(4, 3)
    np.testing.assert_allclose(interpreter.run(running_sum, a), a.sum(1, keepdims=True), rtol=1e-6)
    assert [list(interpreter.nl.affine_range(2, 5)), list(interpreter.nl.sequential_range(3))] == [[2, 3, 4], [0, 1, 2]]


@pytest.mark.parametrize("module", ["tiles", "first_layer_input", "lm_head"])
def test_kernel_source_is_in_the_documented_nki_subset(module):
    # The NKI front end documents named functions only and plain range loops (affine_range and
    # sequential_range are deprecated aliases of range): no lambda, no nl.*_range in kernel code.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module(f"neuron_peagle.kernels.{module}")))
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
    assert not [node.lineno for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr in ("affine_range", "sequential_range", "static_range")]


def test_the_kernels_own_tiling_keeps_them_within_limits(monkeypatch):
    # With 1024-column vocabulary tiles the LM head kernel would overflow a PSUM bank.
    monkeypatch.setattr(interpreter.tile_size, "gemm_moving_fmax", 1024)
    kernel, args = lm_head_argmax_call(torch.randn(3, 64), torch.randn(2000, 64), None)
    with pytest.raises(NkiInterpreterError, match="PSUM tile .* more than one 2048-byte bank"):
        interpreter.run(kernel, *args)


def test_kernel_modes_are_checked():
    assert check_kernel_mode("reference") == "reference"
    assert BuildConfig(backend="neuron").kernels == "nki" and BuildConfig(backend="nxd").kernels == "nki"
    assert BuildConfig(backend="xla").kernels == "reference" and BuildConfig(backend="inductor").kernels == "reference"
    assert BuildConfig(kernels="interpreter").kernels == "interpreter"
    with pytest.raises(ConfigError, match="only with backend 'eager'"):
        BuildConfig(backend="xla", kernels="interpreter")
    with pytest.raises(ConfigError, match="kernels must be 'auto' or one of"):
        BuildConfig(kernels="fast")
    with pytest.raises(ConfigError, match="kernels must be one of"):
        check_kernel_mode("fast")
    if not HAVE_NKI:
        with pytest.raises(BackendUnavailableError, match="needs the Neuron SDK's nki package"):
            check_kernel_mode("nki")


# ---- the speculative step: the same tokens with the kernels as before them ------------------


class UnfusedProposer(DrafterProposer):
    """The drafter proposer as it was before the kernels: Drafter.embed / project / forward, then the
    argmax over materialised logits."""

    def prefill(self, features, input_ids, lengths):
        batch, bucket = input_ids.shape
        slot = torch.arange(bucket).expand(batch, bucket)
        valid = slot <= (lengths - 2).unsqueeze(-1)
        next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        no_mask = torch.zeros_like(valid)
        embeds = self.drafter.embed(next_tokens, no_mask, self.target_embedding)
        hidden = self.drafter.project(features, no_mask)
        self.drafter(embeds, hidden, torch.where(valid, slot, torch.full_like(slot, self.trash)), self.cache, None)

    def _target_ids(self, logits):
        ids = logits.argmax(-1)
        return ids + self.drafter.d2t[ids]

    def _propose_parallel(self, state, k):
        d = self.drafter
        batch = state.pending_tokens.shape[0]
        real_positions, _ = self._real_slots(state)
        positions = torch.cat([real_positions, state.last_position.unsqueeze(-1) + torch.arange(k - 1)], dim=1)
        is_mask = torch.arange(2 * k).expand(batch, 2 * k) > k
        tokens = torch.cat([state.pending_tokens, torch.zeros(batch, k - 1, dtype=torch.int64)], 1)
        features = torch.cat([state.pending_features, state.pending_features.new_zeros(
            batch, k - 1, state.pending_features.shape[-1])], dim=1)
        embeds = d.embed(tokens, is_mask, self.target_embedding)
        hidden = d.project(features, is_mask)
        logits, _ = d(embeds, hidden, positions, self.cache, torch.arange(k, 2 * k).expand(batch, k))
        return self._target_ids(logits)

    def _propose_sequential(self, state, k):
        d = self.drafter
        batch = state.pending_tokens.shape[0]
        positions, _ = self._real_slots(state)
        no_mask = torch.zeros(batch, k + 1, dtype=torch.bool)
        embeds = d.embed(state.pending_tokens, no_mask, self.target_embedding)
        hidden = d.project(state.pending_features, no_mask)
        logits, h = d(embeds, hidden, positions, self.cache, torch.full((batch, 1), k))
        drafts = [self._target_ids(logits[:, 0])]
        for step in range(1, k):
            embeds = d.embed(drafts[-1].unsqueeze(-1), torch.zeros(batch, 1, dtype=torch.bool), self.target_embedding)
            position = (state.last_position + step - 1).unsqueeze(-1)
            logits, h = d(embeds, h, position, self.cache, torch.zeros(batch, 1, dtype=torch.int64))
            drafts.append(self._target_ids(logits[:, 0]))
        return torch.stack(drafts, dim=1)


class UnfusedStep(SpecStepGraph):
    """The greedy step as it was before the kernels: argmax over the target's materialised logits."""

    def forward(self, temperature, top_k, top_p, accept_uniform, sample_uniform):
        k, state = self.num_speculative_tokens, self.state
        batch = state.pending_tokens.shape[0]
        state.last_position.clamp_(max=self.cache.max_length - k - 2)
        drafts = self.proposer.propose(state, k)
        offsets = torch.arange(k + 1)
        out = self.target(torch.cat([state.pending_tokens[:, -1:], drafts], dim=1),
                          state.last_position.unsqueeze(-1) + offsets, self.cache, offsets.expand(batch, k + 1),
                          return_features=True)
        tokens, counts = greedy_accept(drafts, out.logits.argmax(-1))
        source = (offsets - (k + 1 - counts).unsqueeze(-1)).clamp(min=0)
        state.pending_features.copy_(out.features.gather(
            1, source.unsqueeze(-1).expand(-1, -1, out.features.shape[-1])))
        state.pending_tokens.copy_(tokens.gather(1, source))
        state.pending_count.copy_(counts)
        state.last_position.add_(counts)
        return SpecStepOutputs(tokens, counts, self.proposer.commit(state))


def run_steps(target, drafter, kernels, unfused, prompts, bucket, k, parallel, steps):
    """Prefill + `steps` greedy steps -> per step (drafts, tokens, counts), and the final caches."""
    batch = len(prompts)
    proposer = (UnfusedProposer if unfused else DrafterProposer)(drafter, target, batch, parallel, kernels=kernels)
    cache = target.new_cache(batch)
    state = SpecState(batch, k, 3 * target.config.hidden_size, target.embed_tokens.weight.dtype)
    prefill = SpecPrefillGraph(target, proposer, cache, state, greedy=True)
    step = (UnfusedStep if unfused else SpecStepGraph)(target, proposer, cache, state, k, greedy=True, kernels=kernels)
    drafts = []
    propose = proposer.propose

    def recording_propose(s, k):
        drafts.append(propose(s, k))
        return drafts[-1]

    proposer.propose = recording_propose
    ids = torch.zeros(batch, bucket, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    zeros, ones = torch.zeros(batch), torch.ones(batch)
    history = []
    with torch.no_grad():
        # No one-row twin here: the prefill graph runs on the whole batch's state (slot unused).
        prefill(*SpecPrefillInputs(ids, torch.tensor([len(p) for p in prompts]), torch.zeros(1, dtype=torch.int64),
                                   zeros, zeros.long(), ones, torch.rand(batch, 1)))
        for _ in range(steps):
            out = step(*SpecStepInputs(zeros, zeros.long(), ones, torch.rand(batch, k), torch.rand(batch, k + 1)))
            history.append((drafts[-1], out.tokens, out.counts))
    return history, cache, proposer.cache


def check_same_steps(target, drafter, prompts, bucket, k, parallel, steps):
    before, target_cache, drafter_cache = run_steps(target, drafter, "reference", True, prompts, bucket, k, parallel,
                                                    steps)
    for kernels in ("reference", "interpreter"):
        after, t_cache, d_cache = run_steps(target, drafter, kernels, False, prompts, bucket, k, parallel, steps)
        for i, ((d0, t0, c0), (d1, t1, c1)) in enumerate(zip(before, after)):
            assert torch.equal(d0, d1) and torch.equal(t0, t1) and torch.equal(c0, c1), f"{kernels}: step {i} differs"
        for ours, theirs in ((t_cache, target_cache), (d_cache, drafter_cache)):
            for layer in range(ours.num_layers):
                for a, b in zip(ours.layer(layer), theirs.layer(layer)):
                    if kernels == "reference":  # the same operations: the same bits
                        assert torch.equal(a, b)
                    else:
                        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    return before


@pytest.fixture(scope="module")
def tiny_target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir, 64)


@pytest.mark.parametrize("parallel, reduced_vocab, norm_before_residual", [
    (True, False, False), (True, True, True), (False, True, False)])
def test_step_with_kernels_gives_the_tokens_of_the_unfused_step(tiny_target, parallel, reduced_vocab,
                                                                norm_before_residual):
    target = tiny_target
    config = DrafterConfig.for_target(target.config, target.feature_layers, num_layers=2,
                                      draft_vocab_size=500 if reduced_vocab else None,
                                      norm_before_residual=norm_before_residual)
    drafter = random_drafter(config, 64, seed=7)
    if reduced_vocab:
        drafter.d2t.copy_(torch.arange(500) * 37)  # draft id i -> target id 38 i
    torch.manual_seed(0)
    prompts = [torch.randint(3, 400, (9,)).tolist(), torch.randint(3, 400, (14,)).tolist()]
    history = check_same_steps(target, drafter, prompts, bucket=16, k=3, parallel=parallel, steps=5)
    if reduced_vocab:  # drafts are target ids of the reduced vocabulary
        assert all(bool((d % 38 == 0).all()) for d, _, _ in history)


@pytest.mark.slow
def test_step_with_kernels_on_the_default_model_and_its_drafter(default_model_dir, prompt_ids):
    from neuron_peagle.models.drafter_io import load_drafter
    from neuron_peagle.runtime.drafter_choice import DEFAULT_DRAFTER_DIR, read_drafter_config

    config = read_drafter_config(DEFAULT_DRAFTER_DIR)
    target = TargetModel.from_pretrained(default_model_dir, 256, feature_layers=config.feature_layers)
    drafter = load_drafter(DEFAULT_DRAFTER_DIR, target.config, 256)
    prompts = prompt_ids[:2]
    bucket = 64 * -(-max(map(len, prompts)) // 64)
    history = check_same_steps(target, drafter, prompts, bucket=bucket, k=7, parallel=True, steps=6)
    assert max(int(c.max()) for _, _, c in history) > 2  # the trained drafter gets drafts accepted


def test_engine_switch_runs_the_kernel_source_with_the_same_tokens(tiny_llama_dir):
    kwargs = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=64, prefill_buckets=(16,))
    fused = make_engine(tiny_llama_dir, kernels="interpreter", **kwargs)
    assert fused.runner.proposer.kernels == "interpreter"
    assert {graph.kernels for _, steps in fused.runner.graphs.values() for graph in steps.values()} == {"interpreter"}
    plain = make_engine(tiny_llama_dir, **kwargs)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    assert [o.output_ids for o in fused.generate(prompts, params)] == [o.output_ids for o in plain.generate(prompts, params)]
