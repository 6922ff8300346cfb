// The CPU kernels of a cached decode step, declared for the fused Qwen2 step
// (decoder_step_cpu.cpp), which calls them directly: the same functions the
// hcr::decode_linear, hcr::ragged_cache_write_ and hcr::decode_attention ops run.
#pragma once

#include <ATen/ATen.h>

namespace hcr {

at::Tensor decode_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

void ragged_cache_write_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_states,
                            const at::Tensor& value_states, const at::Tensor& start, const at::Tensor& count);

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& positions, double scale, int64_t window);

}  // namespace hcr
