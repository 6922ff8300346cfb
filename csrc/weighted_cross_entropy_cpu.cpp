// CPU kernel of hcr::weighted_cross_entropy_fwd_: per-token cross entropy and, in
// the same pass, the gradient of the weighted sum with respect to the logits
// (as Liger-Kernel does): the caller scales it by grad_output in the backward, so
// the logits never have to be read again.
//
//   losses[i]      = logsumexp(logits[i]) - logits[i, labels[i]]        (0 if ignored)
//   grad_logits[i] = weights[i] * (softmax(logits[i]) - onehot(labels[i])) (0 if ignored)
//
// Parallel over tokens (at::parallel_for); per token three passes over the row
// (max, exp + sum, scale), the row staying in L2. fp32 accumulation for fp32,
// fp16 and bf16 (fp16/bf16 rows are converted to a per-thread fp32 buffer), fp64
// for fp64. The fp32 inner loops run on vectors of the ISA's register width; the
// build has no -march flag, so they are compiled for AVX-512, AVX2 and the
// baseline and run for the active ISA (cpu_isa.h). exp() is vec_math.h's
// polynomial (about 2 ulp; exactly 0 below exp(-87.3), i.e. for -inf logits).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace hcr {
namespace {

struct RowMax {
  template <int Lanes>
  static HCR_INLINE float run(const float* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
    if (n >= Lanes) {
      vfloat<Lanes> acc = load_v<Lanes>(x);
      for (j = Lanes; j + Lanes <= n; j += Lanes) {
        const vfloat<Lanes> v = load_v<Lanes>(x + j);
        acc = v > acc ? v : acc;
      }
      for (int k = 0; k < Lanes; ++k) m = acc[k] > m ? acc[k] : m;
    }
    for (; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
};

// sum_j exp(x[j] - m); when out is not null it also stores exp(x[j] - m) (out may alias x).
struct ExpSum {
  template <int Lanes>
  static HCR_INLINE float run(const float* x, float* out, int64_t n, float m) {
    vfloat<Lanes> acc = vfloat<Lanes>{};
    int64_t j = 0;
    for (; j + Lanes <= n; j += Lanes) {
      const vfloat<Lanes> v = exp_nonpositive_v<Lanes>(load_v<Lanes>(x + j) - m);  // x <= m
      if (out != nullptr) store_v<Lanes>(out + j, v);
      acc += v;
    }
    float total = 0.0f;
    for (; j < n; ++j) {
      const float v = exp_approx(x[j] - m);
      if (out != nullptr) out[j] = v;
      total += v;
    }
    return total + lane_sum<Lanes>(acc);
  }
};

struct Scale {
  template <int Lanes>
  static HCR_INLINE void run(float* y, int64_t n, float a) {
    for (int64_t j = 0; j < n; ++j) y[j] *= a;
  }
};

// Tokens per parallel task: enough elements per task to amortise scheduling.
int64_t grain_tokens(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

inline void check_label(int64_t label, int64_t vocab, int64_t token) {
  TORCH_CHECK(label >= 0 && label < vocab, "hcr::weighted_cross_entropy_fwd_: labels[", token, "] = ", label,
              " is outside [0, ", vocab, ") and is not ignore_index");
}

// fp32, fp16, bf16 logits: fp32 math on the row (the fp32 row itself, or a converted copy).
template <typename scalar_t>
void ce_rows_f32(const scalar_t* logits, const int64_t* labels, const float* weights, int64_t ignore_index,
                 float* losses, scalar_t* grad, int64_t tokens, int64_t vocab) {
  at::parallel_for(0, tokens, grain_tokens(vocab), [&](int64_t begin, int64_t end) {
    constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
    std::vector<float> buffer(is_f32 ? 0 : vocab);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = labels[i];
      scalar_t* grad_row = grad != nullptr ? grad + i * vocab : nullptr;
      if (label == ignore_index) {
        losses[i] = 0.0f;
        if (grad_row != nullptr) std::memset(grad_row, 0, vocab * sizeof(scalar_t));
        continue;
      }
      check_label(label, vocab, i);
      const scalar_t* row = logits + i * vocab;
      const float* x;
      float* g;
      if constexpr (is_f32) {
        x = row;
        g = grad_row;
      } else {
        for (int64_t j = 0; j < vocab; ++j) buffer[j] = static_cast<float>(row[j]);
        x = buffer.data();
        g = grad_row != nullptr ? buffer.data() : nullptr;
      }
      const float picked = x[label];  // read before g (possibly x itself) is overwritten
      const float m = run_for_active_isa<RowMax>(x, vocab);
      const float sum = run_for_active_isa<ExpSum>(x, g, vocab, m);
      losses[i] = m + std::log(sum) - picked;
      if (g == nullptr) continue;
      const float w = weights[i];
      run_for_active_isa<Scale>(g, vocab, w / sum);
      g[label] -= w;
      if constexpr (!is_f32) {
        for (int64_t j = 0; j < vocab; ++j) grad_row[j] = static_cast<scalar_t>(buffer[j]);
      }
    }
  });
}

// fp64 logits: the same computation with std::exp, for checks in double precision.
void ce_rows_f64(const double* logits, const int64_t* labels, const double* weights, int64_t ignore_index,
                 double* losses, double* grad, int64_t tokens, int64_t vocab) {
  at::parallel_for(0, tokens, grain_tokens(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = labels[i];
      double* g = grad != nullptr ? grad + i * vocab : nullptr;
      if (label == ignore_index) {
        losses[i] = 0.0;
        if (g != nullptr) std::memset(g, 0, vocab * sizeof(double));
        continue;
      }
      check_label(label, vocab, i);
      const double* x = logits + i * vocab;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < vocab; ++j) m = x[j] > m ? x[j] : m;
      double sum = 0.0;
      for (int64_t j = 0; j < vocab; ++j) sum += std::exp(x[j] - m);
      losses[i] = m + std::log(sum) - x[label];
      if (g == nullptr) continue;
      const double w = weights[i];
      for (int64_t j = 0; j < vocab; ++j) g[j] = w * std::exp(x[j] - m) / sum;
      g[label] -= w;
    }
  });
}

}  // namespace

void weighted_cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
                                    int64_t ignore_index, const at::Tensor& losses,
                                    const std::optional<at::Tensor>& grad_logits) {
  const char* op = "hcr::weighted_cross_entropy_fwd_";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), op, " (CPU kernel): tensors must be on the CPU, logits is on ", logits.device());
  const int64_t tokens = logits.size(0), vocab = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == tokens && labels.scalar_type() == at::kLong,
              op, ": labels must be int64 [N] with N = ", tokens, ", got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == tokens && weights.scalar_type() == acc_type, op,
              ": weights must be ", acc_type, " [N] with N = ", tokens, ", got ", weights.scalar_type(), " ",
              weights.sizes());
  TORCH_CHECK(losses.dim() == 1 && losses.size(0) == tokens && losses.scalar_type() == acc_type, op,
              ": losses must be ", acc_type, " [N] with N = ", tokens, ", got ", losses.scalar_type(), " ",
              losses.sizes());
  TORCH_CHECK(logits.is_contiguous() && labels.is_contiguous() && weights.is_contiguous() && losses.is_contiguous(),
              op, ": logits, labels, weights and losses must be contiguous");
  for (const at::Tensor* t : {&labels, &weights, &losses})
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU kernel): all tensors must be on the CPU");
  if (grad_logits.has_value()) {
    const at::Tensor& g = *grad_logits;
    TORCH_CHECK(g.sizes() == logits.sizes() && g.scalar_type() == logits.scalar_type() && g.is_contiguous() &&
                    g.device().is_cpu(),
                op, ": grad_logits must be a contiguous CPU tensor of logits' shape ", logits.sizes(), " and dtype ",
                logits.scalar_type(), ", got ", g.scalar_type(), " ", g.sizes());
  }
  if (tokens == 0 || vocab == 0) {
    TORCH_CHECK(tokens == 0, op, ": logits has N = ", tokens, " tokens but an empty vocabulary");
    return;
  }
  if (logits.scalar_type() == at::kDouble) {
    ce_rows_f64(logits.const_data_ptr<double>(), labels.const_data_ptr<int64_t>(), weights.const_data_ptr<double>(),
                ignore_index, losses.mutable_data_ptr<double>(),
                grad_logits.has_value() ? grad_logits->mutable_data_ptr<double>() : nullptr, tokens, vocab);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hcr::weighted_cross_entropy_fwd_", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      ce_rows_f32<scalar_t>(logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                            weights.const_data_ptr<float>(), ignore_index, losses.mutable_data_ptr<float>(),
                            grad_logits.has_value() ? grad_logits->mutable_data_ptr<scalar_t>() : nullptr, tokens,
                            vocab);
    }
  });
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def(
      "weighted_cross_entropy_fwd_(Tensor logits, Tensor labels, Tensor weights, int ignore_index, "
      "Tensor(a!) losses, Tensor(b!)? grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("weighted_cross_entropy_fwd_", &hcr::weighted_cross_entropy_fwd_cpu); }
