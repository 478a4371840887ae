"""The kernels as custom ops (neuron_peagle.kernels.ops): the ops give the reference functions' results,
pass torch.library.opcheck, stay one node each in a graph captured by torch.compile(fullgraph=True,
dynamic=False), run under inductor as in eager; the NKI implementation is registered for TorchNeuron's
device, refused without nki, and its glue (arguments in, outputs out) matches the reference when the
kernel source runs on the interpreter; on XLA tensors the functions stay inline."""

from __future__ import annotations

import pytest
import torch

from neuron_peagle import kernels
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.kernels import DraftInputParams, draft_input_reference, interpreter, launch, ops
from neuron_peagle.kernels import lm_head as lm_head_module
from neuron_peagle.kernels.lm_head import lm_head_argmax_reference
from neuron_peagle.kernels.nki_api import HAVE_NKI
from neuron_peagle.models.layers import RMSNorm

HIDDEN, TARGET_HIDDEN, VOCAB = 16, 8, 40
LEAD = (2, 5)  # [batch, slots]
DTYPES = [torch.float32, torch.bfloat16]
OP_LM_HEAD = torch.ops.neuron_peagle.lm_head_argmax.default
OP_DRAFT_INPUT = torch.ops.neuron_peagle.draft_input.default


def make_params(norm_before_residual: bool, dtype: torch.dtype, g: torch.Generator) -> DraftInputParams:
    norms = []
    for eps in (1e-5, 1e-6):  # different eps: the op must keep each norm's own
        norm = RMSNorm(HIDDEN, eps)
        norm.weight.data = (1 + 0.3 * torch.randn(HIDDEN, generator=g)).to(dtype)
        norms.append(norm)
    fc = torch.randn(HIDDEN, 3 * TARGET_HIDDEN, generator=g) / (3 * TARGET_HIDDEN) ** 0.5
    return DraftInputParams(fc.to(dtype), torch.randn(HIDDEN, generator=g).to(dtype),
                            torch.randn(HIDDEN, generator=g).to(dtype), norms[0], norms[1], norm_before_residual)


def make_inputs(dtype: torch.dtype, reduced: bool, norm_before_residual: bool = False, seed: int = 0):
    """Draft-pass inputs: embeds [2, 5, H], features [2, 5, 3H_t], is_mask [2, 5], params, the LM head
    weight [vocab, H] and the vocabulary map d2t [vocab] (or None)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(*LEAD, HIDDEN, generator=g).to(dtype)
    features = torch.randn(*LEAD, 3 * TARGET_HIDDEN, generator=g).to(dtype)
    is_mask = torch.rand(*LEAD, generator=g) < 0.4
    is_mask[0, 0], is_mask[0, 1] = True, False  # both kinds of slot, whatever the seed
    params = make_params(norm_before_residual, dtype, g)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dtype)
    d2t = torch.arange(VOCAB) * 3 if reduced else None  # draft id i -> target id 4 i
    return embeds, features, is_mask, params, weight, d2t


def assert_same(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        assert torch.equal(a, b)


# ---- the ops are the reference functions --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced", [False, True])
def test_lm_head_argmax_op_is_the_reference(dtype, reduced):
    embeds, _, _, _, weight, d2t = make_inputs(dtype, reduced)
    want = lm_head_argmax_reference(embeds, weight, d2t)
    assert_same(ops.lm_head_argmax(embeds, weight, d2t), want)
    assert_same(kernels.lm_head_argmax(embeds, weight, d2t), want)
    if reduced:
        assert bool((want[0] % 4 == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_draft_input_op_is_the_reference(dtype, norm_before_residual):
    embeds, features, is_mask, params, _, _ = make_inputs(dtype, False, norm_before_residual)
    want = draft_input_reference(embeds, features, is_mask, params)
    assert want[0].shape == (*LEAD, 2 * HIDDEN) and want[1].shape == (*LEAD, HIDDEN)
    assert_same(ops.draft_input(embeds, features, is_mask, *ops.draft_input_args(params)), want)
    assert_same(kernels.draft_input(embeds, features, is_mask, params), want)


def test_draft_input_op_keeps_each_norm_and_the_residual_choice():
    # The flattening must not swap the two norms' weights or eps, nor drop norm_before_residual.
    embeds, features, is_mask, params, _, _ = make_inputs(torch.float32, False)
    x, residual = kernels.draft_input(embeds, features, is_mask, params)
    swapped = params._replace(input_layernorm=params.hidden_norm, hidden_norm=params.input_layernorm)
    assert not torch.equal(x, draft_input_reference(embeds, features, is_mask, swapped)[0])
    _, normed_residual = kernels.draft_input(embeds, features, is_mask, params._replace(norm_before_residual=True))
    assert torch.equal(normed_residual, x[..., HIDDEN:]) and not torch.equal(residual, normed_residual)


def test_ops_return_fresh_tensors():
    embeds, features, is_mask, params, weight, _ = make_inputs(torch.float32, False, norm_before_residual=True)
    inputs = [embeds, features, is_mask, weight, *ops.draft_input_args(params)[:5]]
    outputs = [*ops.draft_input(embeds, features, is_mask, *ops.draft_input_args(params)),
               *ops.lm_head_argmax(embeds, weight, None)]
    pointers = {t.untyped_storage().data_ptr() for t in inputs}
    assert all(o.untyped_storage().data_ptr() not in pointers for o in outputs)
    assert len({o.untyped_storage().data_ptr() for o in outputs}) == len(outputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced, norm_before_residual", [(False, False), (True, True)])
def test_opcheck(dtype, reduced, norm_before_residual):
    embeds, features, is_mask, params, weight, d2t = make_inputs(dtype, reduced, norm_before_residual)
    torch.library.opcheck(OP_LM_HEAD, (embeds, weight, d2t))
    torch.library.opcheck(OP_DRAFT_INPUT, (embeds, features, is_mask, *ops.draft_input_args(params)))


def test_unknown_mode_is_refused():
    embeds, _, _, _, weight, _ = make_inputs(torch.float32, False)
    with pytest.raises(ConfigError, match="kernels must be one of"):
        kernels.lm_head_argmax(embeds, weight, None, mode="fast")


# ---- compiled graphs keep each kernel as one op --------------------------------------------------


def draft_pass(params: DraftInputParams, weight: torch.Tensor, d2t: torch.Tensor | None):
    """A graph around both kernels: layer 0's input, a stand-in for the layers, the greedy drafts."""

    def run(embeds, features, is_mask):
        x, residual = kernels.draft_input(embeds, features, is_mask, params)
        h = x[..., HIDDEN:] * 0.5 + residual
        ids, best = kernels.lm_head_argmax(h, weight, d2t)
        return ids + 1, best, x, residual

    return run


@pytest.mark.parametrize("reduced", [False, True])
def test_compiled_graph_holds_one_node_per_kernel(reduced):
    embeds, features, is_mask, params, weight, d2t = make_inputs(torch.float32, reduced)
    graphs = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = draft_pass(params, weight, d2t)
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(embeds, features, is_mask)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op in ("call_function", "call_method")]
    assert targets.count(OP_LM_HEAD) == 1 and targets.count(OP_DRAFT_INPUT) == 1
    insides = [t for t in targets if getattr(t, "__name__", t) in ("argmax", "matmul", "rsqrt", "where", "cat")]
    assert not insides, f"the graph holds the kernels' insides: {insides}"
    assert_same(got, fn(embeds, features, is_mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inductor_gives_the_eager_outputs(dtype):
    embeds, features, is_mask, params, weight, d2t = make_inputs(dtype, True, norm_before_residual=True, seed=3)
    fn = draft_pass(params, weight, d2t)
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad():
        got, want = compiled(embeds, features, is_mask), fn(embeds, features, is_mask)
    # The kernels run the same code compiled or not; inductor only fuses the elementwise ops around them.
    assert_same(got, want)


# ---- the NKI implementation --------------------------------------------------------------------


@pytest.mark.skipif(HAVE_NKI, reason="checks the refusal where nki is missing")
def test_nki_mode_without_nki_is_refused():
    embeds, features, is_mask, params, weight, _ = make_inputs(torch.float32, False)
    with pytest.raises(BackendUnavailableError, match="needs the Neuron SDK's nki package"):
        kernels.check_kernel_mode("nki")
    with pytest.raises(BackendUnavailableError, match="runs on Neuron tensors"):
        kernels.lm_head_argmax(embeds, weight, None, mode="nki")
    with pytest.raises(BackendUnavailableError, match="runs on Neuron tensors"):
        kernels.draft_input(embeds, features, is_mask, params, mode="nki")


class InterpreterJit:
    """`nki.jit(kernel)` stood in for by the CPU interpreter, `[lnc]` included: the kernel's outputs as CPU
    tensors, its body run once per physical core."""

    def __init__(self, kernel, lnc: int = 1) -> None:
        self.kernel, self.lnc, self.launched = kernel, lnc, []

    def __getitem__(self, lnc: int) -> "InterpreterJit":
        return InterpreterJit(self.kernel, lnc)

    def __call__(self, *args):
        LAUNCHES.append((self.kernel.__name__, self.lnc))
        return [torch.from_numpy(out) for out in interpreter.run(self.kernel, *args, lnc=self.lnc)]


LAUNCHES: list[tuple[str, int]] = []


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("rows", [6, 300])  # one row tile (core 1 idles at LNC 2), three tiles (split 2 + 1)
@pytest.mark.parametrize("reduced, norm_before_residual", [(False, False), (True, True)])
def test_nki_launches_match_the_reference_at_each_lnc(monkeypatch, reduced, norm_before_residual, rows, lnc):
    # What the neuron device runs, with nki.jit replaced by the interpreter: the kernels' arguments, the
    # launch at the build's LNC (each physical core its row tiles of the shared outputs) and the outputs
    # with the reference's shapes and dtypes.
    monkeypatch.setattr(launch, "_jit", InterpreterJit)
    LAUNCHES.clear()
    _, _, _, params, weight, d2t = make_inputs(torch.float32, reduced, norm_before_residual)
    g = torch.Generator().manual_seed(rows)
    embeds, features = torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, 3 * TARGET_HIDDEN, generator=g)
    is_mask = torch.rand(rows, generator=g) < 0.4
    want_x, want_residual = draft_input_reference(embeds, features, is_mask, params)
    x, residual = launch.run_draft_input("nki", embeds, features, is_mask, params, lnc)
    assert (x.shape, x.dtype, residual.shape, residual.dtype) == (want_x.shape, want_x.dtype, want_residual.shape,
                                                                  want_residual.dtype)
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual, want_residual, rtol=1e-5, atol=1e-5)
    want_ids, want_best = lm_head_argmax_reference(want_x[..., HIDDEN:], weight, d2t)
    ids, best = launch.run_lm_head_argmax("nki", want_x[..., HIDDEN:].contiguous(), weight, d2t, lnc)
    assert (ids.shape, ids.dtype, best.dtype) == (want_ids.shape, want_ids.dtype, want_best.dtype)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(best, want_best, rtol=1e-5, atol=1e-5)
    assert [n for _, n in LAUNCHES] == [lnc, lnc]


def test_at_lnc_2_each_core_writes_its_row_tiles(monkeypatch):
    """Three row tiles at LNC 2: core 0 writes tiles 0 and 2, core 1 tile 1, of the one shared output."""
    from neuron_peagle.kernels import tiles

    seen = []
    original = tiles.for_each_row_tile

    def spy(size, body, operands):
        def recording(operands, index, start, length):
            seen.append((interpreter.program_id(0), index))
            body(operands, index, start, length)

        original(size, recording, operands)

    monkeypatch.setattr(lm_head_module, "for_each_row_tile", spy)
    hidden, weight = torch.randn(300, HIDDEN), torch.randn(40, HIDDEN)
    ids, _ = launch.launch("interpreter", *launch.lm_head_argmax_call(hidden, weight, None), lnc=2)
    assert sorted(seen) == [(0, 0), (0, 2), (1, 1)]
    assert torch.equal(ids.reshape(-1).long(), (hidden @ weight.T).argmax(-1))


# ---- XLA tensors stay inline (the torch-xla environment) ---------------------------------------


@pytest.mark.xla
def test_xla_tensors_run_inline_and_the_op_would_give_the_same_hlo(monkeypatch):
    import torch_xla  # marked xla: runs in the torch-xla environment, never skipped there
    from torch_xla import _XLAC

    embeds, features, is_mask, params, weight, d2t = make_inputs(torch.float32, True)
    device = torch_xla.device()
    embeds, features, is_mask, weight, d2t = (t.to(device) for t in (embeds, features, is_mask, weight, d2t))
    params = DraftInputParams(params.fc_weight.to(device), params.fc_mask_row.to(device),
                              params.mask_embedding.to(device), params.input_layernorm.to(device),
                              params.hidden_norm.to(device), params.norm_before_residual)
    inline = [*draft_input_reference(embeds, features, is_mask, params), *lm_head_argmax_reference(embeds, weight, d2t)]
    through_op = [*ops.draft_input(embeds, features, is_mask, *ops.draft_input_args(params)),
                  *ops.lm_head_argmax(embeds, weight, d2t)]
    assert _XLAC._get_xla_tensors_hlo(through_op) == _XLAC._get_xla_tensors_hlo(inline)

    def refuse(*args):
        raise AssertionError("the custom op was called on XLA tensors")

    monkeypatch.setattr(ops, "draft_input", refuse)
    monkeypatch.setattr(ops, "lm_head_argmax", refuse)
    got = [*kernels.draft_input(embeds, features, is_mask, params), *kernels.lm_head_argmax(embeds, weight, d2t)]
    assert _XLAC._get_xla_tensors_hlo(got) == _XLAC._get_xla_tensors_hlo(inline)
    for a, b in zip(got, inline):
        assert torch.equal(a.cpu(), b.cpu())
