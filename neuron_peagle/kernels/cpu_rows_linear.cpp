// The CPU backends' linear for decode-sized calls (1..8 rows: a decode step, a verify of K+1
// tokens): out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), weight in nn.Linear's row-major
// [N, K]. Each weight row is read once, in order, for all rows of x (bfloat16: AVX512-BF16 dot products;
// float32: FMAs; float32 accumulation), and the output columns are split over the ATen (OpenMP) threads.
//
// Why: oneDNN's bfloat16 matmul for one row reads a streamed weight at about a third of the bandwidth
// a plain sum reaches on the same machine (BENCHMARKS.md, "Where a decode step's milliseconds go").
// Built at first use by neuron_peagle/kernels/cpu_linear.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int64_t kRows = 8;  // input rows per pass over a weight row
// From 4 rows on, the dot products of a weight row take longer than its read, and the hardware prefetcher
// no longer runs far enough ahead: the read and the arithmetic take turns (8 rows: the sum of both).
// Asking for the bytes kPrefetch ahead overlaps them (8 rows: 19-20 -> 11.5-15.5 ms for the 30 layers,
// scripts/bench_rows_linear.py); at 1-2 rows the stream is the bound and the prefetcher keeps up alone.
constexpr int kPrefetchRows = 4;
constexpr int64_t kPrefetch = 4096;  // bytes ahead of the weight read (a few weight rows)

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// What differs between the dtypes: a chunk of elements in one 512-bit register, its loads (whole, and
// masked for the tail of K) and its multiply-accumulate into 16 float32 lanes.
struct Bf16 {  // bfloat16 bits; AVX512-BF16 dot products of element pairs
  using Element = uint16_t;
  using Vector = __m512bh;
  static constexpr int64_t kChunk = 32;
  KERNEL static Vector load(const Element* p) { return (Vector)_mm512_loadu_si512(p); }
  KERNEL static Vector load(const Element* p, int64_t left) {
    return left >= kChunk ? load(p) : (Vector)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
  }
  KERNEL static __m512 dot(__m512 acc, Vector x, Vector w) { return _mm512_dpbf16_ps(acc, x, w); }
};

struct F32 {  // float32; FMAs
  using Element = float;
  using Vector = __m512;
  static constexpr int64_t kChunk = 16;
  KERNEL static Vector load(const Element* p) { return _mm512_loadu_ps(p); }
  KERNEL static Vector load(const Element* p, int64_t left) {
    return left >= kChunk ? load(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
  }
  KERNEL static __m512 dot(__m512 acc, Vector x, Vector w) { return _mm512_fmadd_ps(x, w, acc); }
};

template <typename T>
struct TypeOf;
template <>
struct TypeOf<uint16_t> { using Type = Bf16; };
template <>
struct TypeOf<float> { using Type = F32; };

// out[m] (floats) = sum_k x[m][k] * w[k] for MB rows against one weight row, read once and in order
// (one sequential stream: what the hardware prefetcher follows best). Two accumulators per row, over
// even and odd chunks. Every row gets the same instruction sequence whatever MB is, so a row's result
// never depends on the other rows in the call.
template <int MB, typename D>
KERNEL void block(const typename D::Element* x, int64_t K, const typename D::Element* w, float* out) {
  constexpr int64_t C = D::kChunk;
  __m512 even[MB], odd[MB];
  for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * C <= K; k += 2 * C) {
    if (MB >= kPrefetchRows) {  // the next 128 bytes, kPrefetch ahead (two cache lines)
      const char* ahead = reinterpret_cast<const char*>(w + k) + kPrefetch;
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
    }
    const auto w0 = D::load(w + k);
    const auto w1 = D::load(w + k + C);
    for (int m = 0; m < MB; ++m) {
      even[m] = D::dot(even[m], D::load(x + m * K + k), w0);
      odd[m] = D::dot(odd[m], D::load(x + m * K + k + C), w1);
    }
  }
  for (; k < K; k += C) {
    const auto w0 = D::load(w + k, K - k);
    for (int m = 0; m < MB; ++m) even[m] = D::dot(even[m], D::load(x + m * K + k, K - k), w0);
  }
  for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m]));
}

template <typename T>
void rows_block(const T* x, int64_t rows, int64_t K, const T* w, float* out) {
  using D = typename TypeOf<T>::Type;
  switch (rows) {
    case 1: block<1, D>(x, K, w, out); break;
    case 2: block<2, D>(x, K, w, out); break;
    case 3: block<3, D>(x, K, w, out); break;
    case 4: block<4, D>(x, K, w, out); break;
    case 5: block<5, D>(x, K, w, out); break;
    case 6: block<6, D>(x, K, w, out); break;
    case 7: block<7, D>(x, K, w, out); break;
    default: block<8, D>(x, K, w, out); break;
  }
}

// out [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]); T the storage (uint16_t: bfloat16 bits, or float),
// O the output element type.
template <typename T, typename O>
void rows_linear_into(const T* xp, const T* wp, const O* bp, O* op, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    float part[kRows];
    for (int64_t n = n0; n < n1; ++n) {
      const float b = bp ? static_cast<float>(bp[n]) : 0.0f;
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = M - m0 < kRows ? M - m0 : kRows;
        rows_block(xp + m0 * K, rows, K, wp + n * K, part);
        for (int64_t m = 0; m < rows; ++m) op[(m0 + m) * N + n] = O(part[m] + b);
      }
    }
  });
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(x.scalar_type() == dtype && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "rows_linear: bfloat16 or float32 only, x and weight alike");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rows_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "rows_linear: x [..., K] and weight [N, K]");
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor xc = x.reshape({-1, K}).contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t M = xc.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == N, "rows_linear: bias [N] of the weight's dtype");
    bc = bias->contiguous();
  }
  if (dtype == at::kBFloat16) {
    rows_linear_into(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                     reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()),
                     bc.defined() ? bc.data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(), M, K, N);
  } else {
    rows_linear_into(xc.data_ptr<float>(), wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
                     out.data_ptr<float>(), M, K, N);
  }
  return out.view(shape);
}

bool supported() { return __builtin_cpu_supports("avx512bf16"); }

}  // namespace

TORCH_LIBRARY(neuron_peagle_cpu, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("supported() -> bool");
}

TORCH_LIBRARY_IMPL(neuron_peagle_cpu, CPU, m) { m.impl("rows_linear", &rows_linear); }
TORCH_LIBRARY_IMPL(neuron_peagle_cpu, CompositeExplicitAutograd, m) { m.impl("supported", &supported); }
