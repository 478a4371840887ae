// Dot products for the CPU backends' decode-sized kernels (cpu_rows_linear.cpp, cpu_attention.cpp):
// one 512-bit chunk of bfloat16 or float32 elements per load, float32 accumulation, and `block`, the
// dot products of up to 8 rows against one row read once, in order.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace neuron_peagle_cpu {

constexpr int64_t kRows = 8;  // input rows per pass over a weight row
// From 4 rows on, the dot products of a weight row take longer than its read, and the hardware prefetcher
// no longer runs far enough ahead: the read and the arithmetic take turns (8 rows: the sum of both).
// Asking for the bytes kPrefetch ahead overlaps them (8 rows: 19-20 -> 11.5-15.5 ms for the 30 layers,
// scripts/bench_rows_linear.py); at 1-2 rows the stream is the bound and the prefetcher keeps up alone.
constexpr int kPrefetchRows = 4;
constexpr int64_t kPrefetch = 4096;  // bytes ahead of the weight read (a few weight rows)

#define NEURON_PEAGLE_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// What differs between the dtypes: a chunk of elements in one 512-bit register, its loads (whole, and
// masked for the tail of K) and its multiply-accumulate into 16 float32 lanes.
struct Bf16 {  // bfloat16 bits; AVX512-BF16 dot products of element pairs
  using Element = uint16_t;
  using Vector = __m512bh;
  static constexpr int64_t kChunk = 32;
  NEURON_PEAGLE_KERNEL static Vector load(const Element* p) { return (Vector)_mm512_loadu_si512(p); }
  NEURON_PEAGLE_KERNEL static Vector load(const Element* p, int64_t left) {
    return left >= kChunk ? load(p) : (Vector)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
  }
  NEURON_PEAGLE_KERNEL static __m512 dot(__m512 acc, Vector x, Vector w) { return _mm512_dpbf16_ps(acc, x, w); }
};

struct F32 {  // float32; FMAs
  using Element = float;
  using Vector = __m512;
  static constexpr int64_t kChunk = 16;
  NEURON_PEAGLE_KERNEL static Vector load(const Element* p) { return _mm512_loadu_ps(p); }
  NEURON_PEAGLE_KERNEL static Vector load(const Element* p, int64_t left) {
    return left >= kChunk ? load(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
  }
  NEURON_PEAGLE_KERNEL static __m512 dot(__m512 acc, Vector x, Vector w) { return _mm512_fmadd_ps(x, w, acc); }
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
NEURON_PEAGLE_KERNEL void block(const typename D::Element* x, int64_t K, const typename D::Element* w, float* out) {
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

}  // namespace neuron_peagle_cpu
