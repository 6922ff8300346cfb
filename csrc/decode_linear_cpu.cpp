// CPU kernel of hcr::decode_linear: out[m, n] = sum_k input[m, k] * weight[n, k] + bias[n]
// for a few input rows m (a decode step: one row per sequence of the batch).
//
// Why a kernel of our own: with one to a few rows, a linear layer reads every
// weight once and does two flops per weight, so its speed is how fast it streams
// the weights. On this project's machines (AMD EPYC) the BLAS call F.linear reaches
// for M = 1 (MKL sgemv) streams them at about a third of what this plain vectorised
// loop gets (benchmarks/test_bench_decode_linear.py).
//
// Layout: input [..., K] (M rows in all), weight [N, K] (rows contiguous, any row
// stride), bias [N] or none, out [..., N] in the input's dtype. Parallel over output
// features: each thread takes a contiguous block of weight rows. The M input rows
// are converted to fp32 once (M * K floats, a few KiB, they stay in L1/L2); each
// weight row is loaded once per group of up to 4 input rows, converted to fp32 in
// registers, and multiplied into 2 accumulators per input row (8 FMA chains for a
// group of 4). fp32 accumulation for fp32, bf16 and fp16. The hot loop is compiled
// for AVX-512, AVX2 (+F16C) and the baseline, each with vectors of its register
// width (cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace hcr {
namespace {

// dots[r] = <w, x[r]> for R input rows x[r] = x + r * K (fp32), one pass over the weight row w.
template <typename T, int R, int Lanes>
HCR_INLINE void dot_rows(const T* w, const float* x, int64_t K, float* dots) {
  vfloat<Lanes> even[R] = {}, odd[R] = {};
  int64_t k = 0;
  for (; k + 2 * Lanes <= K; k += 2 * Lanes) {
    const vfloat<Lanes> w0 = load_as_float<T, Lanes>(w + k), w1 = load_as_float<T, Lanes>(w + k + Lanes);
    for (int r = 0; r < R; ++r) {
      even[r] += w0 * load_v<Lanes>(x + r * K + k);
      odd[r] += w1 * load_v<Lanes>(x + r * K + k + Lanes);
    }
  }
  for (; k + Lanes <= K; k += Lanes) {
    const vfloat<Lanes> w0 = load_as_float<T, Lanes>(w + k);
    for (int r = 0; r < R; ++r) even[r] += w0 * load_v<Lanes>(x + r * K + k);
  }
  for (int r = 0; r < R; ++r) dots[r] = lane_sum<Lanes>(even[r] + odd[r]);
  for (; k < K; ++k) {
    const float wk = static_cast<float>(w[k]);
    for (int r = 0; r < R; ++r) dots[r] += wk * x[r * K + k];
  }
}

// out[m, n] (fp32, row stride N) for weight rows n in [n0, n1) and all M input rows.
template <typename T>
struct LinearBlock {
  template <int Lanes>
  static HCR_INLINE void run(const T* weight, int64_t weight_stride, const float* x, const float* bias, float* out,
                             int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* w = weight + n * weight_stride;
      const float b = bias != nullptr ? bias[n] : 0.0f;
      float dots[4];
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        dot_rows<T, 4, Lanes>(w, x + m * K, K, dots);
        for (int r = 0; r < 4; ++r) out[(m + r) * N + n] = dots[r] + b;
      }
      for (; m + 2 <= M; m += 2) {
        dot_rows<T, 2, Lanes>(w, x + m * K, K, dots);
        for (int r = 0; r < 2; ++r) out[(m + r) * N + n] = dots[r] + b;
      }
      if (m < M) {
        dot_rows<T, 1, Lanes>(w, x + m * K, K, dots);
        out[m * N + n] = dots[0] + b;
      }
    }
  }
};

void linear_block_any(const at::Tensor& weight, const float* x, const float* bias, float* out, int64_t M, int64_t N,
                      int64_t K, int64_t n0, int64_t n1) {
  const int64_t stride = weight.stride(0);
  switch (weight.scalar_type()) {
    case at::kFloat:
      return run_for_active_isa<LinearBlock<float>>(weight.const_data_ptr<float>(), stride, x, bias, out, M, N, K, n0,
                                                    n1);
    case at::kBFloat16:
      return run_for_active_isa<LinearBlock<c10::BFloat16>>(weight.const_data_ptr<c10::BFloat16>(), stride, x, bias,
                                                            out, M, N, K, n0, n1);
    default:
      return run_for_active_isa<LinearBlock<c10::Half>>(weight.const_data_ptr<c10::Half>(), stride, x, bias, out, M,
                                                        N, K, n0, n1);
  }
}

// A tensor's values as a contiguous fp32 buffer (a view of it when it already is one).
const float* as_float(const at::Tensor& t, std::vector<float>& storage) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.const_data_ptr<float>();
  const at::Tensor converted = t.to(at::kFloat).contiguous();
  storage.assign(converted.const_data_ptr<float>(), converted.const_data_ptr<float>() + converted.numel());
  return storage.data();
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "hcr::decode_linear (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(input.dim() >= 1, "hcr::decode_linear: input must be [..., K], got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, "hcr::decode_linear: weight must be [N, K], got ", weight.sizes());
  const int64_t K = input.size(-1), N = weight.size(0);
  int64_t M = 1;  // rows: the product of the leading dims
  for (int64_t d = 0; d + 1 < input.dim(); ++d) M *= input.size(d);
  TORCH_CHECK(weight.size(1) == K, "hcr::decode_linear: weight must be [N, K] = [N, ", K, "] to match input ",
              input.sizes(), ", got ", weight.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hcr::decode_linear: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(input.scalar_type() == dtype, "hcr::decode_linear: input is ", input.scalar_type(), " but weight is ", dtype);
  TORCH_CHECK(K <= 1 || weight.stride(1) == 1, "hcr::decode_linear: weight rows must be contiguous, got strides ",
              weight.strides());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "hcr::decode_linear: bias must be [N] = [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, "hcr::decode_linear: bias is ", bias->scalar_type(), " but weight is ", dtype);
  }
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, input.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // an empty sum: the bias alone, as F.linear gives
    out.zero_();
    return bias.has_value() ? out.add_(*bias) : out;
  }
  std::vector<float> x_storage, bias_storage;
  const float* x = as_float(input, x_storage);
  const float* b = bias.has_value() ? as_float(*bias, bias_storage) : nullptr;
  const bool direct = dtype == at::kFloat;  // fp32 results go straight to out
  at::Tensor staging = direct ? out : at::empty(out_sizes, input.options().dtype(at::kFloat));
  float* result = staging.mutable_data_ptr<float>();
  // About 32K weights (128 KiB of fp32) per task: small layers run on one thread, big ones on all.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    linear_block_any(weight, x, b, result, M, N, K, n0, n1);
  });
  if (!direct) out.copy_(staging);
  return out;
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) { m.def("decode_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("decode_linear", &hcr::decode_linear_cpu); }
