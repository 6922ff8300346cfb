// The CPU kernels of a cached decode step, declared for the fused Qwen2 step
// (decoder_step_cpu.cpp) and a direct decode_linear call (hcr_ops.cpp), which call them
// directly: the same functions the hcr::decode_linear, hcr::ragged_cache_write_ and
// hcr::decode_attention ops run.
#pragma once

#include <ATen/ATen.h>

namespace hcr {

at::Tensor decode_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// hcr_kernels.decode_linear's takes_native: bit row_bucket(rows) of the mask `buckets`, where the bucket of
// `rows` is the bit length of rows - 1 (1 row: 0, 2: 1, 3-4: 2, 5-8: 3, ...; a mask of -1 has every bit).
inline bool takes_native(int64_t rows, int64_t buckets) {
  const int bucket = rows <= 1 ? 0 : 64 - __builtin_clzll(static_cast<uint64_t>(rows - 1));
  return (static_cast<uint64_t>(buckets) >> bucket) & 1;
}

void ragged_cache_write_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_states,
                            const at::Tensor& value_states, const at::Tensor& start, const at::Tensor& count);

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& positions, double scale, int64_t window);

}  // namespace hcr
