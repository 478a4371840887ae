"""The CPU backends' attention over a KV cache (kernels/cpu_attention.py) against Attention.attend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron_peagle.kernels.cpu_attention import CacheAttention, use_cache_attention
from neuron_peagle.kernels.cpu_ops import cpu_ops
from neuron_peagle.models.layers import Attention, LayerConfig

OPS = cpu_ops()
needs_op = pytest.mark.skipif(OPS is None, reason="this CPU has no AVX512-BF16 (or no compiler): PyTorch's attention runs")


def _attention(heads: int, kv_heads: int, head_dim: int) -> Attention:
    return Attention(LayerConfig(hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                 intermediate_size=8, eps=1e-6))


def _case(batch, kv_heads, groups, tokens, length, head_dim, dtype, seed, slice_to=None):
    """q [B, nkv, groups*T, hd], a cache's keys and values [B, nkv, L, hd] (sliced to `slice_to` slots as
    the eager backend narrows it: strided), positions [B, T] of consecutive tokens within the cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, groups * tokens, head_dim, generator=g).to(dtype)
    keys = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype)
    if slice_to is not None:
        keys, values, length = keys[:, :, :slice_to], values[:, :, :slice_to], slice_to
    start = torch.randint(0, length - tokens + 1, (batch, 1), generator=g)
    return q, keys, values, start + torch.arange(tokens)


@needs_op
@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 4), tokens=st.integers(1, 8),
       length=st.integers(8, 300), head_dim=st.sampled_from([8, 16, 24, 64, 128]), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), sliced=st.booleans())
def test_the_kernel_attends_as_the_reference(batch, kv_heads, groups, tokens, length, head_dim, seed, dtype, sliced):
    """Every shape a decode or verify step has (head dims with a tail chunk, a cache narrowed by slicing):
    within rounding of the reference's float32 softmax and bf16 roundings."""
    q, keys, values, positions = _case(batch, kv_heads, groups, tokens, length, head_dim, dtype, seed,
                                       slice_to=length // 2 + tokens if sliced else None)
    attention = _attention(kv_heads * groups, kv_heads, head_dim).to(dtype)
    want = attention.attend_cache(q, keys, values, positions)
    got = OPS.decode_attention(q, keys, values, positions)
    assert got.shape == want.shape and got.dtype == dtype
    # float32: accumulation order; bf16: a score or probability may round to the neighbouring bf16 value.
    tolerance = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_gets_the_same_bits_whatever_its_neighbours_and_stale_slots_are_never_read(dtype):
    """A verify's row gets what a one-token decode at its position gets, bit for bit; the slots past every
    row's position may hold anything (NaN here), as rejected drafts leave them."""
    q, keys, values, positions = _case(2, 3, 3, 8, 200, 64, dtype, seed=1)
    last = int(positions.max())
    keys[:, :, last + 1:] = float("nan")
    values[:, :, last + 1:] = float("nan")
    together = OPS.decode_attention(q, keys, values, positions)
    assert not together.isnan().any()
    rows = q.view(2, 3, 3, 8, 64)
    for t in range(8):
        alone = OPS.decode_attention(rows[:, :, :, t].contiguous(), keys, values, positions[:, t:t + 1])
        assert torch.equal(alone, together.view(2, 3, 3, 8, 64)[:, :, :, t])


@needs_op
def test_cache_attention_module_uses_it_only_where_it_applies():
    attention, windowed = _attention(4, 2, 16), _attention(4, 2, 16)
    windowed.sliding_window = 8
    module = torch.nn.ModuleList([attention, windowed])
    assert use_cache_attention(module) == 1
    assert type(attention) is CacheAttention and type(windowed) is Attention
    q, keys, values, positions = _case(1, 2, 2, 70, 128, 16, torch.float32, seed=2)  # 140 rows: a prefill
    torch.testing.assert_close(attention.attend_cache(q, keys, values, positions),
                               Attention.attend_cache(attention, q, keys, values, positions))
