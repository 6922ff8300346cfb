// CPU kernel of hcr::ragged_cache_write_: one task per (row, head, key|value),
// each a memcpy of the row's count[b] * Dh elements (one run when both sides are
// contiguous along the sequence, else one run of Dh per step), parallel over
// tasks with at::parallel_for. A copy does not depend on the dtype, only on its
// width, so the kernel moves bytes; the four supported dtypes are checked in
// ragged_cache_write.h. Bounds of start/count are checked here (B values already on
// the host, so free), so that no call can write out of range on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "decode_ops.h"
#include "ragged_cache_write.h"

namespace hcr {
namespace {

// One cache and its new states, with byte strides along B, H and S (or T).
struct CopySide {
  char* cache;
  const char* states;
  int64_t cache_stride[3];
  int64_t states_stride[3];
};

CopySide copy_side(const at::Tensor& cache, const at::Tensor& states) {
  const int64_t size = cache.element_size();
  return {static_cast<char*>(cache.mutable_data_ptr()),
          static_cast<const char*>(states.const_data_ptr()),
          {cache.stride(0) * size, cache.stride(1) * size, cache.stride(2) * size},
          {states.stride(0) * size, states.stride(1) * size, states.stride(2) * size}};
}

}  // namespace

void ragged_cache_write_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_states,
                            const at::Tensor& value_states, const at::Tensor& start, const at::Tensor& count) {
  check_ragged_cache_write_args(key_cache, value_cache, key_states, value_states, start, count);
  TORCH_CHECK(key_cache.device().is_cpu(), "hcr::ragged_cache_write_ (CPU kernel): tensors must be on the CPU");
  const int64_t batch = key_cache.size(0), heads = key_cache.size(1), slots = key_cache.size(2);
  const int64_t steps = key_states.size(2), row_bytes = key_cache.size(3) * key_cache.element_size();
  const int64_t* starts = start.const_data_ptr<int64_t>();
  const int64_t* counts = count.const_data_ptr<int64_t>();
  // The messages (and ValueError) of hcr_kernels.kv_cache.check_write_bounds, which the
  // Python layer skips for this kernel.
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(starts[b] >= 0, "start[", b, "] = ", starts[b], " must be >= 0");
    TORCH_CHECK_VALUE(counts[b] >= 0 && counts[b] <= steps, "count[", b, "] = ", counts[b], " must be in [0, T] = [0, ",
                      steps, "] (T = key_states.shape[2])");
    // start <= S - count, not start + count <= S: a start near 2^63 made the sum wrap and the write land far
    // outside the cache. The sum is printed as an unsigned one: both parts are >= 0 here, so it is exact.
    TORCH_CHECK_VALUE(starts[b] <= slots - counts[b], "start[", b, "] + count[", b, "] = ", starts[b], " + ", counts[b],
                      " = ", static_cast<uint64_t>(starts[b]) + static_cast<uint64_t>(counts[b]),
                      " exceeds the cache length S = ", slots, " (key_cache.shape[2])");
  }
  if (row_bytes == 0) return;
  const CopySide sides[2] = {copy_side(key_cache, key_states), copy_side(value_cache, value_states)};
  // Tasks per chunk: about 64 KiB of copying each, so a decode step (T = 1) runs on one thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, steps * row_bytes));
  at::parallel_for(0, 2 * batch * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const CopySide& side = sides[task % 2];
      const int64_t b = task / 2 / heads, h = task / 2 % heads, n = counts[b];
      if (n == 0) continue;
      char* dst = side.cache + b * side.cache_stride[0] + h * side.cache_stride[1] + starts[b] * side.cache_stride[2];
      const char* src = side.states + b * side.states_stride[0] + h * side.states_stride[1];
      if (side.cache_stride[2] == row_bytes && side.states_stride[2] == row_bytes) {
        std::memcpy(dst, src, n * row_bytes);
        continue;
      }
      for (int64_t t = 0; t < n; ++t) {
        std::memcpy(dst + t * side.cache_stride[2], src + t * side.states_stride[2], row_bytes);
      }
    }
  });
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def(
      "ragged_cache_write_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key_states, Tensor value_states, "
      "Tensor start, Tensor count) -> ()");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("ragged_cache_write_", &hcr::ragged_cache_write_cpu); }
