// CPU kernel of hcr::qwen2_decoder_step: a cached step of a Qwen2 decoder stack, every
// layer in one call.
//
// Why: a small model's decode step on a CPU is mostly the Python between its ops (the
// tiny benchmark model: ~30 ATen ops per layer, each a few microseconds of interpreter
// and dispatch around a kernel that takes one or two). This runs the same arithmetic, in
// the same order, on the same tensors as hcr_kernels/decoder_step/reference.py (itself
// the order of transformers' Qwen2DecoderLayer.forward), so its output is bit for bit the
// reference's: each projection through decode_linear_cpu where its row bucket mask says
// so (hcr_kernels.decode_linear's takes_native) and at::linear otherwise, the cache write through
// ragged_cache_write_cpu, the attention through decode_attention_cpu, the residual adds,
// SiLU and the norms' means as ATen ops, and the elementwise rest of the norms and the
// rotary embedding as loops that round as those ATen ops do (in-process microbenchmark,
// Intel Xeon: the rotary embedding of one layer's query and key 9.1 -> 0.67 us; the
// tiny model's step 690 -> 625 us with the norms too).
//
// weights: 12 per layer, in the order of kWeights; native_buckets: 7 per layer (q, k, v,
// o, gate, up, down); eps: 2 per layer (the two norms); scales and windows: 1 per layer;
// final_norm: the model's last norm, applied after the last layer when given.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decode_ops.h"

namespace hcr {
namespace {

enum Weight { kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kPostNorm, kGate, kUp, kDown, kWeights };
enum Projection { kQMask, kKMask, kVMask, kOMask, kGateMask, kUpMask, kDownMask, kProjections };

// The squares of `hidden`'s elements in fp32 (Qwen2RMSNorm's hidden.to(float32).pow(2): exact products).
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void square(const scalar_t* hidden, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float value = float(hidden[i]);
    out[i] = value * value;
  }
}

// The rest of Qwen2RMSNorm after its mean: weight * (states * rsqrt(variance + eps)).to(dtype), per element in
// the order and roundings of those ATen ops (fp32 sum with eps cast to fp32, 1 / sqrt as ATen's rsqrt, the
// product rounded to the dtype, the weight's product rounded again), not contracted into an FMA.
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void normalise(const scalar_t* hidden, const float* variance,
                                                             const scalar_t* weight, float eps, scalar_t* out,
                                                             int64_t rows, int64_t width) {
  for (int64_t row = 0; row < rows; ++row) {
    const float inverse = 1.0f / std::sqrt(variance[row] + eps);
    for (int64_t i = 0; i < width; ++i) {
      const scalar_t normed = scalar_t(float(hidden[row * width + i]) * inverse);
      out[row * width + i] = scalar_t(float(weight[i]) * float(normed));
    }
  }
}

// Qwen2RMSNorm.forward: the square mean in fp32, the weight times the normed states in their own dtype. Its
// seven ATen ops on one row of a few hundred values cost mostly their dispatch; here the elementwise ones
// are loops with their exact arithmetic (tests compare with the ATen ops) and the mean stays ATen's, whose
// summation order is its own.
at::Tensor rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  const at::Tensor states = hidden.contiguous();
  const int64_t width = states.size(-1), rows = width ? states.numel() / width : 0;
  TORCH_CHECK(weight.numel() == width && weight.scalar_type() == states.scalar_type(),
              "hcr::qwen2_decoder_step: a norm's weight must be [", width, "] of the states' dtype ",
              states.scalar_type(), ", got ", weight.sizes(), " ", weight.scalar_type());
  at::Tensor squares = at::empty(states.sizes(), states.options().dtype(at::kFloat));
  at::Tensor out = at::empty(states.sizes(), states.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, states.scalar_type(), "qwen2_decoder_step norm", [&] {
    square<scalar_t>(states.data_ptr<scalar_t>(), squares.data_ptr<float>(), states.numel());
    const at::Tensor variance = squares.mean(-1, /*keepdim=*/true);
    normalise<scalar_t>(states.data_ptr<scalar_t>(), variance.data_ptr<float>(),
                        weight.contiguous().data_ptr<scalar_t>(), static_cast<float>(eps), out.data_ptr<scalar_t>(),
                        rows, width);
  });
  return out;
}

// transformers' apply_rotary_pos_emb on one of query / key: states * cos + rotate_half(states) * sin, with
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]). Seven ATen ops on a few hundred elements, each mostly
// its own dispatch; here one loop doing what they do per element: each product and the sum in fp32, each
// rounded to the dtype (ATen's mul and add on 16-bit tensors do the same), and not contracted into an FMA,
// so the bits are theirs (tests compare with the ATen ops on every dtype and ISA). states [B, H, T, D]
// with stride 1 along D (a transposed view of the projection), cos and sin [B, T, D] contiguous; returns
// [B, H, T, D] contiguous.
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void rotate_rows(const at::Tensor& states, const scalar_t* cos,
                                                               const scalar_t* sin, scalar_t* out) {
  const int64_t batch = states.size(0), heads = states.size(1), steps = states.size(2), dim = states.size(3);
  const int64_t half = dim / 2;
  const scalar_t* in = states.data_ptr<scalar_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < steps; ++t) {
        const scalar_t* x = in + b * states.stride(0) + h * states.stride(1) + t * states.stride(2);
        const scalar_t* c = cos + (b * steps + t) * dim;
        const scalar_t* s = sin + (b * steps + t) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const scalar_t rotated = d < half ? scalar_t(-float(x[d + half])) : x[d - half];
          const scalar_t straight = scalar_t(float(x[d]) * float(c[d]));
          const scalar_t turned = scalar_t(float(rotated) * float(s[d]));
          *out++ = scalar_t(float(straight) + float(turned));
        }
      }
    }
  }
}

at::Tensor rotate(const at::Tensor& states, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(states.stride(3) == 1 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(0) == states.size(0) && cos.size(1) == states.size(2) && cos.size(2) == states.size(3),
              "hcr::qwen2_decoder_step: cos and sin must be contiguous [B, T, head_dim] = [", states.size(0), ", ",
              states.size(2), ", ", states.size(3), "], got ", cos.sizes(), " and ", sin.sizes());
  at::Tensor out = at::empty(states.sizes(), states.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, states.scalar_type(), "qwen2_decoder_step rotate", [&] {
    rotate_rows<scalar_t>(states, cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

// hcr_kernels.decode_linear's apply_decode_linear: the kernel for the row counts of `buckets`, the weight's dtype.
at::Tensor project(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   int64_t buckets) {
  const int64_t rows = input.numel() / std::max<int64_t>(input.size(-1), 1);
  if (!takes_native(rows, buckets) || input.scalar_type() != weight.scalar_type()) {
    return at::linear(input, weight, bias);
  }
  const bool rows_contiguous = weight.size(1) <= 1 || weight.stride(1) == 1;
  return decode_linear_cpu(input, rows_contiguous ? weight : weight.contiguous(), bias);
}

at::Tensor dh_contiguous(const at::Tensor& states) {
  return states.size(-1) <= 1 || states.stride(-1) == 1 ? states : states.contiguous();
}

}  // namespace

at::Tensor qwen2_decoder_step_cpu(const at::Tensor& embeds, const at::Tensor& cos, const at::Tensor& sin,
                                  at::TensorList weights, at::TensorList key_caches, at::TensorList value_caches,
                                  const at::Tensor& start, const at::Tensor& count, int64_t span,
                                  const at::Tensor& positions, at::IntArrayRef native_buckets, at::ArrayRef<double> eps,
                                  at::ArrayRef<double> scales, at::IntArrayRef windows, int64_t head_dim,
                                  const c10::optional<at::Tensor>& final_norm, double final_eps) {
  const char* op = "hcr::qwen2_decoder_step: ";
  const size_t layers = key_caches.size();
  TORCH_CHECK(embeds.dim() == 3, op, "embeds must be [B, T, hidden], got ", embeds.sizes());
  TORCH_CHECK(value_caches.size() == layers && weights.size() == layers * kWeights &&
                  native_buckets.size() == layers * kProjections && eps.size() == layers * 2 &&
                  scales.size() == layers && windows.size() == layers,
              op, "per layer: 1 key and 1 value cache, ", int(kWeights), " weights, ", int(kProjections),
              " row bucket masks, 2 eps, 1 scale and 1 window; got ", key_caches.size(), " key caches, ",
              value_caches.size(), " value caches, ", weights.size(), " weights, ", native_buckets.size(),
              " row bucket masks, ", eps.size(), " eps, ", scales.size(), " scales, ", windows.size(), " windows");
  TORCH_CHECK(span >= 0, op, "span must be >= 0, got ", span);
  const at::ScalarType dtype = embeds.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              "takes float32, bfloat16 or float16 (its loops compute in fp32), got ", dtype);
  at::AutoDispatchBelowAutograd inference_only;  // no autograd graph for the ops inside: the step is not differentiable
  const int64_t batch = embeds.size(0), steps = embeds.size(1);
  const std::vector<int64_t> heads{batch, steps, -1, head_dim};
  const at::Tensor cos_rows = cos.contiguous(), sin_rows = sin.contiguous();
  const at::Tensor write_start = start.contiguous(), write_count = count.contiguous();
  at::Tensor hidden = embeds;
  for (size_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = &weights[layer * kWeights];
    const int64_t* buckets = &native_buckets[layer * kProjections];
    at::Tensor normed = rms_norm(hidden, w[kInputNorm], eps[2 * layer]);
    at::Tensor query = project(normed, w[kQ], w[kQBias], buckets[kQMask]).view(heads).transpose(1, 2);
    at::Tensor key = project(normed, w[kK], w[kKBias], buckets[kKMask]).view(heads).transpose(1, 2);
    at::Tensor value = project(normed, w[kV], w[kVBias], buckets[kVMask]).view(heads).transpose(1, 2);
    query = rotate(query, cos_rows, sin_rows);
    key = rotate(key, cos_rows, sin_rows);
    ragged_cache_write_cpu(key_caches[layer], value_caches[layer], dh_contiguous(key), dh_contiguous(value),
                           write_start, write_count);
    at::Tensor attended = decode_attention_cpu(query, key_caches[layer].slice(2, 0, span),
                                               value_caches[layer].slice(2, 0, span), positions, scales[layer],
                                               windows[layer]);
    hidden = hidden + project(attended.reshape({batch, steps, -1}).contiguous(), w[kO], c10::nullopt, buckets[kOMask]);
    normed = rms_norm(hidden, w[kPostNorm], eps[2 * layer + 1]);
    at::Tensor gated = at::silu(project(normed, w[kGate], c10::nullopt, buckets[kGateMask])) *
                       project(normed, w[kUp], c10::nullopt, buckets[kUpMask]);
    hidden = hidden + project(gated, w[kDown], c10::nullopt, buckets[kDownMask]);
  }
  return final_norm.has_value() ? rms_norm(hidden, *final_norm, final_eps) : hidden;
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def(
      "qwen2_decoder_step(Tensor embeds, Tensor cos, Tensor sin, Tensor[] weights, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor start, Tensor count, int span, Tensor positions, int[] native_buckets, "
      "float[] eps, float[] scales, int[] windows, int head_dim, Tensor? final_norm, float final_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("qwen2_decoder_step", &hcr::qwen2_decoder_step_cpu); }
