// CPU depthwise causal conv1d (Mamba's short conv), forward and backward, fp32.
//
//   pre[b, t, c] = bias[c] + sum_k w[k, c] * x[b, t - (K - 1) + k, c]    (x before t = 0 is 0)
//   out = silu(pre) or pre
//
// Channels-last layout [batch, L, channels] (what Mamba's projections produce),
// weights as [K, channels]: every inner loop runs over contiguous channels and
// vectorises. One task per batch row; the backward recomputes pre instead of
// saving it, and returns per-row partial sums of the weight and bias gradients.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "vec_math.h"

namespace hcr {
namespace {

struct ConvShape {
  int64_t batch, length, channels, width;
};

// pre-activation of one output row t.
HCR_INLINE void conv_row(const float* x_b, const float* w, const float* bias, const ConvShape& s, int64_t t,
                     float* pre) {
  for (int64_t c = 0; c < s.channels; ++c) pre[c] = bias[c];
  for (int64_t k = 0; k < s.width; ++k) {
    const int64_t src = t - (s.width - 1) + k;
    if (src < 0) continue;
    const float* x_t = x_b + src * s.channels;
    const float* w_k = w + k * s.channels;
    for (int64_t c = 0; c < s.channels; ++c) pre[c] += w_k[c] * x_t[c];
  }
}

struct ConvForwardRow {
  template <int Lanes>
  static HCR_INLINE void run(const float* x, const float* w, const float* bias, const ConvShape& s, bool silu,
                             int64_t b, float* out) {
    const float* x_b = x + b * s.length * s.channels;
    std::vector<float> pre(s.channels), sg(s.channels);
    for (int64_t t = 0; t < s.length; ++t) {
      conv_row(x_b, w, bias, s, t, pre.data());
      float* out_t = out + (b * s.length + t) * s.channels;
      if (silu) {
        SigmoidArray::run<Lanes>(pre.data(), sg.data(), s.channels);
        for (int64_t c = 0; c < s.channels; ++c) out_t[c] = pre[c] * sg[c];
      } else {
        for (int64_t c = 0; c < s.channels; ++c) out_t[c] = pre[c];
      }
    }
  }
};

struct ConvBackwardRow {
  template <int Lanes>
  static HCR_INLINE void run(const float* grad_out, const float* x, const float* w, const float* bias,
                             const ConvShape& s, bool silu, int64_t b, float* dx, float* dw, float* dbias) {
    const int64_t C = s.channels;
    const float* x_b = x + b * s.length * C;
    float* dx_b = dx + b * s.length * C;
    float* dw_b = dw + b * s.width * C;
    float* dbias_b = dbias + b * C;
    std::vector<float> pre(C), sg(C), g(C);
    for (int64_t i = 0; i < s.length * C; ++i) dx_b[i] = 0.f;
    for (int64_t i = 0; i < s.width * C; ++i) dw_b[i] = 0.f;
    for (int64_t c = 0; c < C; ++c) dbias_b[c] = 0.f;
    for (int64_t t = 0; t < s.length; ++t) {
      const float* g_t = grad_out + (b * s.length + t) * C;
      if (silu) {
        conv_row(x_b, w, bias, s, t, pre.data());
        SigmoidArray::run<Lanes>(pre.data(), sg.data(), C);
        for (int64_t c = 0; c < C; ++c) g[c] = g_t[c] * sg[c] * (1.f + pre[c] * (1.f - sg[c]));
      } else {
        for (int64_t c = 0; c < C; ++c) g[c] = g_t[c];
      }
      for (int64_t c = 0; c < C; ++c) dbias_b[c] += g[c];
      for (int64_t k = 0; k < s.width; ++k) {
        const int64_t src = t - (s.width - 1) + k;
        if (src < 0) continue;
        const float* x_t = x_b + src * C;
        const float* w_k = w + k * C;
        float* dx_t = dx_b + src * C;
        float* dw_k = dw_b + k * C;
        for (int64_t c = 0; c < C; ++c) {
          dw_k[c] += g[c] * x_t[c];
          dx_t[c] += w_k[c] * g[c];
        }
      }
    }
  }
};

ConvShape check_conv_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3, "hcr::causal_conv1d: x must be [batch, L, channels], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2) && weight.size(0) >= 1,
              "hcr::causal_conv1d: weight must be [K, channels=", x.size(2), "], got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(2), "hcr::causal_conv1d: bias must be [channels=",
              x.size(2), "], got ", bias.sizes());
  for (const at::Tensor* t : {&x, &weight, &bias}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "hcr::causal_conv1d (CPU kernel): tensors must be contiguous float32 CPU tensors");
  }
  return {x.size(0), x.size(1), x.size(2), weight.size(0)};
}

}  // namespace

at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool silu) {
  const ConvShape s = check_conv_inputs(x, weight, bias);
  at::Tensor out = at::empty_like(x);
  const float *xp = x.const_data_ptr<float>(), *wp = weight.const_data_ptr<float>(), *bp = bias.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) run_for_active_isa<ConvForwardRow>(xp, wp, bp, s, silu, b, op);
  });
  return out;
}

std::vector<at::Tensor> causal_conv1d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& weight, const at::Tensor& bias, bool silu) {
  const ConvShape s = check_conv_inputs(x, weight, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous(),
              "hcr::causal_conv1d_bwd: grad_out must be a contiguous float32 tensor shaped like x");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({s.batch, s.width, s.channels}, x.options());
  at::Tensor dbias = at::empty({s.batch, s.channels}, x.options());
  const float *gp = grad_out.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  const float *wp = weight.const_data_ptr<float>(), *bp = bias.const_data_ptr<float>();
  float *dxp = dx.mutable_data_ptr<float>(), *dwp = dw.mutable_data_ptr<float>(), *dbp = dbias.mutable_data_ptr<float>();
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) run_for_active_isa<ConvBackwardRow>(gp, xp, wp, bp, s, silu, b, dxp, dwp, dbp);
  });
  return {dx, dw, dbias};
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor bias, bool silu) -> Tensor");
  m.def("causal_conv1d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, bool silu) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) {
  m.impl("causal_conv1d_fwd", &hcr::causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_bwd", &hcr::causal_conv1d_bwd_cpu);
}
