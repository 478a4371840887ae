"""The CPU backends' decode-sized matmul (kernels/cpu_linear.py) against F.linear and exact math."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from neuron_peagle.kernels import cpu_linear

OP = cpu_linear.rows_linear_op()
needs_op = pytest.mark.skipif(OP is None, reason="this CPU has no AVX512-BF16 (or no compiler): F.linear runs instead")


def _case(rows: int, k: int, n: int, bias: bool, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@needs_op
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(1, 700), n=st.integers(1, 300), bias=st.booleans(), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_rows_linear_is_a_linear(rows, k, n, bias, seed, dtype):
    """Within float32 accumulation (and, in bf16, one rounding of the result) of the exact product, as
    F.linear is; every length of K (the masked tails) and N."""
    x, w, b = _case(rows, k, n, bias, seed, dtype)
    out = OP(x, w, b)
    assert out.shape == (rows, n) and out.dtype == dtype
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    rounding = 2**-8 if dtype == torch.bfloat16 else 2**-24  # of the result, relative
    assert ((out.double() - exact).abs() <= exact.abs() * rounding + scale * k * 2**-23 + 1e-30).all()
    reference = F.linear(x, w, b).double()
    assert ((out.double() - reference).abs() <= exact.abs() * 2 * rounding + scale * k * 2**-22 + 1e-30).all()


@needs_op
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 8), k=st.sampled_from([64, 576, 600]), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_a_row_gets_the_same_bits_whatever_its_neighbours(rows, k, seed, dtype):
    """A verify of K+1 rows gives each row what a one-row decode would: bit for bit."""
    x, w, b = _case(rows, k, 96, True, seed, dtype)
    together = OP(x, w, b)
    for i in range(rows):
        assert torch.equal(together[i], OP(x[i:i + 1], w, b)[0])
    assert torch.equal(OP(x.view(1, rows, k), w, b).view(rows, -1), together)  # leading dims flatten


@needs_op
def test_rows_linear_module_uses_it_only_where_it_applies():
    layer = nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    kept = nn.Linear(64, 32).to(torch.bfloat16)
    kept.load_state_dict(layer.state_dict())
    model = nn.Sequential(layer, nn.Linear(32, 8).float(), nn.Linear(8, 4).half())  # float16: stays nn.Linear
    assert cpu_linear.use_rows_linear(model) == 2
    assert type(model[0]) is cpu_linear.RowsLinear and type(model[2]) is nn.Linear
    assert model[0].state_dict().keys() == kept.state_dict().keys()
    few = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(model[0](few), OP(few, kept.weight, kept.bias))
    many = torch.randn(cpu_linear.MAX_ROWS + 1, 64).to(torch.bfloat16)  # a prefill: F.linear's kernels
    assert torch.equal(model[0](many), kept(many))


@needs_op
def test_compiled_graph_calls_it_and_agrees_with_eager():
    layer = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    cpu_linear.use_rows_linear(layer)
    x = torch.randn(1, 3, 128).to(torch.bfloat16)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_refusals_name_the_problem():
    if OP is None:
        pytest.skip("no op to refuse with")
    with pytest.raises(RuntimeError, match="bfloat16 or float32 only"):
        OP(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match="weight \\[N, K\\]"):
        OP(torch.randn(1, 8).bfloat16(), torch.randn(4, 9).bfloat16(), None)
