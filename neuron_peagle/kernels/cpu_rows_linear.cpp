// The CPU backends' linear for decode-sized calls (1..8 rows: a decode step, a verify of K+1
// tokens): out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), weight in nn.Linear's row-major
// [N, K]. Each weight row is read once, in order, for all rows of x (bfloat16: AVX512-BF16 dot products;
// float32: FMAs; float32 accumulation), and the output columns are split over the ATen (OpenMP) threads.
//
// Why: oneDNN's bfloat16 matmul for one row reads a streamed weight at about a third of the bandwidth
// a plain sum reaches on the same machine (BENCHMARKS.md, "Where a decode step's milliseconds go").
// Built at first use by neuron_peagle/kernels/cpu_ops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <cstdint>

#include "cpu_dot.h"

namespace {

using namespace neuron_peagle_cpu;

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
