// CPU kernel of hcr::qwen2_decoder_step: a cached step of a Qwen2 decoder stack, every
// layer in one call.
//
// Why: a small model's decode step on a CPU is mostly the Python between its ops (the
// tiny benchmark model: ~30 ATen ops per layer, each a few microseconds of interpreter
// and dispatch around a kernel that takes one or two). This runs the same ops, in the
// same order, on the same tensors as hcr_kernels/decoder_step/reference.py (itself the
// order of transformers' Qwen2DecoderLayer.forward), so its output is bit for bit the
// reference's: the norms and rotary embedding as ATen ops, each projection through
// decode_linear_cpu where the row limit allows (hcr_kernels.decode_linears' rule) and
// at::linear otherwise, the cache write through ragged_cache_write_cpu and the attention
// through decode_attention_cpu.
//
// weights: 12 per layer, in the order of kWeights; native_rows: 7 per layer (q, k, v,
// o, gate, up, down); eps: 2 per layer (the two norms); scales and windows: 1 per layer;
// final_norm: the model's last norm, applied after the last layer when given.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "decode_ops.h"

namespace hcr {
namespace {

enum Weight { kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kPostNorm, kGate, kUp, kDown, kWeights };
enum Projection { kQRows, kKRows, kVRows, kORows, kGateRows, kUpRows, kDownRows, kProjections };

// Qwen2RMSNorm.forward: the square mean in fp32, the weight times the normed states in their own dtype.
at::Tensor rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  at::Tensor states = hidden.to(at::kFloat);
  at::Tensor variance = states.pow(2).mean(-1, /*keepdim=*/true);
  states = states * at::rsqrt(variance + eps);
  return weight * states.to(hidden.scalar_type());
}

// transformers' apply_rotary_pos_emb on one of query / key ([B, H, T, D]; cos, sin [B, 1, T, D]).
at::Tensor rotate(const at::Tensor& states, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = states.size(-1) / 2;
  at::Tensor rotated = at::cat({-states.slice(-1, half), states.slice(-1, 0, half)}, -1);
  return states * cos + rotated * sin;
}

// hcr_kernels.decode_linear's apply_decode_linear: the kernel for at most `row_limit` rows of the weight's dtype.
at::Tensor project(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   int64_t row_limit) {
  if (input.numel() > row_limit * input.size(-1) || input.scalar_type() != weight.scalar_type()) {
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
                                  const at::Tensor& positions, at::IntArrayRef native_rows, at::ArrayRef<double> eps,
                                  at::ArrayRef<double> scales, at::IntArrayRef windows, int64_t head_dim,
                                  const c10::optional<at::Tensor>& final_norm, double final_eps) {
  const char* op = "hcr::qwen2_decoder_step: ";
  const size_t layers = key_caches.size();
  TORCH_CHECK(embeds.dim() == 3, op, "embeds must be [B, T, hidden], got ", embeds.sizes());
  TORCH_CHECK(value_caches.size() == layers && weights.size() == layers * kWeights &&
                  native_rows.size() == layers * kProjections && eps.size() == layers * 2 &&
                  scales.size() == layers && windows.size() == layers,
              op, "per layer: 1 key and 1 value cache, ", int(kWeights), " weights, ", int(kProjections),
              " row limits, 2 eps, 1 scale and 1 window; got ", key_caches.size(), " key caches, ",
              value_caches.size(), " value caches, ", weights.size(), " weights, ", native_rows.size(),
              " row limits, ", eps.size(), " eps, ", scales.size(), " scales, ", windows.size(), " windows");
  TORCH_CHECK(span >= 0, op, "span must be >= 0, got ", span);
  at::AutoDispatchBelowAutograd inference_only;  // no autograd graph for the ops inside: the step is not differentiable
  const int64_t batch = embeds.size(0), steps = embeds.size(1);
  const std::vector<int64_t> heads{batch, steps, -1, head_dim};
  const at::Tensor cos_heads = cos.unsqueeze(1), sin_heads = sin.unsqueeze(1);
  const at::Tensor write_start = start.contiguous(), write_count = count.contiguous();
  at::Tensor hidden = embeds;
  for (size_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = &weights[layer * kWeights];
    const int64_t* rows = &native_rows[layer * kProjections];
    at::Tensor normed = rms_norm(hidden, w[kInputNorm], eps[2 * layer]);
    at::Tensor query = project(normed, w[kQ], w[kQBias], rows[kQRows]).view(heads).transpose(1, 2);
    at::Tensor key = project(normed, w[kK], w[kKBias], rows[kKRows]).view(heads).transpose(1, 2);
    at::Tensor value = project(normed, w[kV], w[kVBias], rows[kVRows]).view(heads).transpose(1, 2);
    query = rotate(query, cos_heads, sin_heads);
    key = rotate(key, cos_heads, sin_heads);
    ragged_cache_write_cpu(key_caches[layer], value_caches[layer], dh_contiguous(key), dh_contiguous(value),
                           write_start, write_count);
    at::Tensor attended = decode_attention_cpu(query, key_caches[layer].slice(2, 0, span),
                                               value_caches[layer].slice(2, 0, span), positions, scales[layer],
                                               windows[layer]);
    hidden = hidden + project(attended.reshape({batch, steps, -1}).contiguous(), w[kO], c10::nullopt, rows[kORows]);
    normed = rms_norm(hidden, w[kPostNorm], eps[2 * layer + 1]);
    at::Tensor gated = at::silu(project(normed, w[kGate], c10::nullopt, rows[kGateRows])) *
                       project(normed, w[kUp], c10::nullopt, rows[kUpRows]);
    hidden = hidden + project(gated, w[kDown], c10::nullopt, rows[kDownRows]);
  }
  return final_norm.has_value() ? rms_norm(hidden, *final_norm, final_eps) : hidden;
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def(
      "qwen2_decoder_step(Tensor embeds, Tensor cos, Tensor sin, Tensor[] weights, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor start, Tensor count, int span, Tensor positions, int[] native_rows, "
      "float[] eps, float[] scales, int[] windows, int head_dim, Tensor? final_norm, float final_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("qwen2_decoder_step", &hcr::qwen2_decoder_step_cpu); }
