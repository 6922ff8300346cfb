// ragged_cache_write_: the KV-cache write of ragged batched decoding.
//
//   cache[b, :, start[b] : start[b] + count[b]] = states[b, :, :count[b]]
//
// for both caches of one layer, all rows in one call; nothing else is written.
// Caches are [B, H, S, Dh] (transformers' StaticCache), states [B, H, T, Dh]
// padded to the longest row. A row that compressed has start[b] below its old
// length (the crop), a finished row has count[b] = 0. The write is a copy, so the
// kernels move bytes: the dtype only sets the width of an element.
//
// Any strides are accepted except along Dh, which must be contiguous: the
// attention layer's states are transposed views of [B, T, H, Dh].
#pragma once

#include <torch/types.h>

namespace hcr {

inline void check_ragged_cache_write_args(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                          const at::Tensor& key_states, const at::Tensor& value_states,
                                          const at::Tensor& start, const at::Tensor& count) {
  constexpr const char* op = "hcr::ragged_cache_write_: ";
  TORCH_CHECK(key_cache.dim() == 4, op, "key_cache must be [B, H, S, Dh], got ", key_cache.sizes());
  TORCH_CHECK(key_states.dim() == 4, op, "key_states must be [B, H, T, Dh], got ", key_states.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, "value_cache is ", value_cache.sizes(),
              " but key_cache is ", key_cache.sizes());
  TORCH_CHECK(value_states.sizes() == key_states.sizes(), op, "value_states is ", value_states.sizes(),
              " but key_states is ", key_states.sizes());
  for (int64_t d : {0, 1, 3}) {
    TORCH_CHECK(key_states.size(d) == key_cache.size(d), op, "key_states ", key_states.sizes(),
                " must match key_cache ", key_cache.sizes(), " in B, H and Dh");
  }
  const int64_t batch = key_cache.size(0);
  for (const at::Tensor* t : {&start, &count}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && t->scalar_type() == at::kLong && t->is_contiguous(), op,
                t == &start ? "start" : "count", " must be a contiguous int64 [B] = [", batch, "] tensor, got ",
                t->scalar_type(), " ", t->sizes());
  }
  const auto dtype = key_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              "the caches must be float32, float64, float16 or bfloat16, got ", dtype);
  const at::Tensor* tensors[] = {&key_cache, &value_cache, &key_states, &value_states};
  const char* names[] = {"key_cache", "value_cache", "key_states", "value_states"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *tensors[i];
    TORCH_CHECK(t.scalar_type() == dtype, op, names[i], " is ", t.scalar_type(), " but key_cache is ", dtype);
    TORCH_CHECK(t.device() == key_cache.device(), op, names[i], " is on ", t.device(), " but key_cache is on ",
                key_cache.device());
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, names[i],
                " must be contiguous along Dh (stride 1 in its last dim), got strides ", t.strides());
  }
  TORCH_CHECK(start.device() == key_cache.device() && count.device() == key_cache.device(), op,
              "start and count must be on key_cache's device ", key_cache.device(), ", got ", start.device(), " and ",
              count.device());
}

}  // namespace hcr
