// The CPU backends' attention of a decode step (or a verify of K+1 tokens) over its KV cache:
//   out[b, h, r] = softmax_s(q[b, h, r] . keys[b, h, s] / sqrt(hd), s <= last[b, r]) . values[b, h, s]
// for the query rows r of KV head h (its query heads side by side, each with the step's T tokens), reading
// only the slots up to the last one any row sees. A fixed-shape graph attends over the whole cache
// (max_length slots) and masks; the live context is usually a fraction of it, and the small batched
// matmuls and the masked softmax over all slots were a fifth of a step (BENCHMARKS.md).
//
// The rounding follows the reference (models/layers.py): scores rounded to the cache dtype, softmax in
// float32, probabilities rounded to the cache dtype, float32 accumulation of the weighted values. A row's
// result does not depend on the other rows. Built at first use by neuron_peagle/kernels/cpu_ops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_dot.h"

namespace {

using namespace neuron_peagle_cpu;

NEURON_PEAGLE_KERNEL inline __mmask16 tail(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// exp(x) for x <= 0 (a score minus the row's largest): 2^n * e^f with f in [-ln2/2, ln2/2], e^f by the
// Cephes polynomial (about 1 ulp); below -87 it gives 2^-126 scale values, which round to nothing beside
// the row's largest term.
NEURON_PEAGLE_KERNEL inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// 16 floats rounded to bfloat16 and back (round to nearest even, as a bf16 tensor stores them).
NEURON_PEAGLE_KERNEL inline __m512 round_bf16(__m512 x) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
NEURON_PEAGLE_KERNEL inline __m512 round_to(__m512 x, float) { return x; }
NEURON_PEAGLE_KERNEL inline __m512 round_to(__m512 x, uint16_t) { return round_bf16(x); }

// scores[0..n) (float32 dot products) -> the softmax's probabilities in the cache dtype's values, as
// the reference: the scores rounded to the cache dtype, / sqrt(hd), softmax in float32, rounded again.
template <typename T>
NEURON_PEAGLE_KERNEL void softmax_row(float* scores, int64_t n, float root) {
  const __m512 root_lanes = _mm512_set1_ps(root);
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail(n - s);
    const __m512 x = _mm512_div_ps(round_to(_mm512_maskz_loadu_ps(m, scores + s), T()), root_lanes);
    _mm512_mask_storeu_ps(scores + s, m, x);
    top = _mm512_mask_max_ps(top, m, top, x);
  }
  const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail(n - s);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), largest));
    _mm512_mask_storeu_ps(scores + s, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  const __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail(n - s);
    _mm512_mask_storeu_ps(scores + s, m, round_to(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, scores + s), scale), T()));
  }
}

inline void store(float x, float* out) { *out = x; }
inline void store(float x, uint16_t* out) { *out = c10::BFloat16(x).x; }

// 16 elements of a value row as float32 lanes (the first `left` of them where fewer remain).
NEURON_PEAGLE_KERNEL inline __m512 load16(const float* p, int64_t left) { return F32::load(p, left); }
NEURON_PEAGLE_KERNEL inline __m512 load16(const uint16_t* p, int64_t left) {
  const __m256i bits = _mm256_maskz_loadu_epi16(tail(left), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// acc[hd] (float32) += p * row[hd], NC chunks of 16 lanes held in registers.
template <int NC, typename T>
NEURON_PEAGLE_KERNEL void weighted_sum(const T* values, int64_t stride, const float* p, int64_t n, int64_t hd,
                                       float* out) {
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    if (p[s] == 0.0f) continue;  // probabilities that rounded to zero add nothing
    const __m512 weight = _mm512_set1_ps(p[s]);
    const T* row = values + s * stride;
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(row + 16 * c, hd - 16 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[c]);
    for (int64_t i = 0; i < 16 && 16 * c + i < hd; ++i) out[16 * c + i] = lanes[i];
  }
}

template <typename T>
void weighted_sum_any(const T* values, int64_t stride, const float* p, int64_t n, int64_t hd, float* out) {
  switch ((hd + 15) / 16) {
    case 1: weighted_sum<1>(values, stride, p, n, hd, out); break;
    case 2: weighted_sum<2>(values, stride, p, n, hd, out); break;
    case 3: weighted_sum<3>(values, stride, p, n, hd, out); break;
    case 4: weighted_sum<4>(values, stride, p, n, hd, out); break;
    case 5: weighted_sum<5>(values, stride, p, n, hd, out); break;
    case 6: weighted_sum<6>(values, stride, p, n, hd, out); break;
    case 7: weighted_sum<7>(values, stride, p, n, hd, out); break;
    default: weighted_sum<8>(values, stride, p, n, hd, out); break;  // hd <= 128 (checked)
  }
}

// One query row of one KV head: q [hd], keys/values rows s = 0..last (row stride `stride`), out [hd].
template <typename T>
void attend_row(const T* q, const T* keys, const T* values, int64_t stride, int64_t hd, int64_t last, float root,
                float* scores, float* acc, T* out) {
  const int64_t n = last + 1;
  for (int64_t s = 0; s < n; ++s) rows_block(q, 1, hd, keys + s * stride, scores + s);
  softmax_row<T>(scores, n, root);
  weighted_sum_any(values, stride, scores, n, hd, acc);
  for (int64_t i = 0; i < hd; ++i) store(acc[i], out + i);
}

// q [B, nkv, R, hd] (R = groups x T query rows per KV head, row r at token r % T), keys and values
// [B, nkv, L, hd] (any strides but a contiguous head dim), last [B, T]: the last slot token t sees.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& last) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "decode_attention: bfloat16 or float32 only");
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype, "decode_attention: one dtype");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(), "decode_attention: 4-d tensors");
  TORCH_CHECK(last.scalar_type() == at::kLong && last.dim() == 2 && last.size(0) == q.size(0),
              "decode_attention: last [B, T] int64");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), hd = q.size(3), L = keys.size(2), T = last.size(1);
  TORCH_CHECK(keys.size(0) == B && keys.size(1) == H && keys.size(3) == hd && R % T == 0 && hd <= 128,
              "decode_attention: shapes");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && keys.stride(2) == values.stride(2),
              "decode_attention: contiguous head dims");
  const at::Tensor qc = q.contiguous();
  const at::Tensor lc = last.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t stride = keys.stride(2);
  const float root = std::sqrt(static_cast<float>(hd));
  const int64_t* lp = lc.data_ptr<int64_t>();
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    at::parallel_for(0, B * H * R, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(L), acc(hd);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (H * R), h = (i / R) % H, r = i % R;
        const int64_t last_slot = std::min(std::max(lp[b * T + r % T], int64_t(0)), L - 1);
        attend_row(qp + i * hd, kp + b * keys.stride(0) + h * keys.stride(1),
                   vp + b * values.stride(0) + h * values.stride(1), stride, hd, last_slot, root, scores.data(),
                   acc.data(), op + i * hd);
      }
    });
  };
  if (dtype == at::kBFloat16) {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    run(bits(qc), bits(keys), bits(values), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    run(qc.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neuron_peagle_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor last) -> Tensor");
}

TORCH_LIBRARY_IMPL(neuron_peagle_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
