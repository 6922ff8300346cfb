// CUDA kernel of hcr::ragged_cache_write_: one launch for both caches. Block x
// = (row, head, key|value), block y = a chunk of the row's new steps; threads copy
// the chunk's count * Dh elements as the widest unit (16, 8, 4 or 2 bytes) that
// every pointer, stride and row of Dh allows, so fp16 rows of 64 move as 16-byte
// vectors. A copy does not depend on the dtype, only on its width: the kernel is
// instantiated per unit, not per dtype (the four dtypes are checked in
// ragged_cache_write.h). start/count bounds are checked by the Python layer (a
// host check here would cost a sync); the kernel asserts them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ragged_cache_write.h"

namespace hcr {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kUnitsPerBlock = 1024;  // 16 KiB per block with 16-byte units
constexpr int64_t kMaxGridY = 65535;

// Base pointers and strides (along B, H, S or T) in units of the copy.
struct CopySide {
  void* cache;
  const void* states;
  int64_t cache_stride[3];
  int64_t states_stride[3];
};

struct CopyArgs {
  CopySide side[2];  // key, value
  const int64_t* start;
  const int64_t* count;
  int64_t heads, slots, steps, row_units, rows_per_block;
};

template <typename unit_t>
__global__ void ragged_cache_write_kernel(const CopyArgs args) {
  const int64_t task = blockIdx.x;
  const CopySide& side = args.side[task % 2];
  const int64_t b = task / 2 / args.heads, h = task / 2 % args.heads;
  const int64_t first = args.start[b], n = args.count[b];
  CUDA_KERNEL_ASSERT(first >= 0 && n >= 0 && n <= args.steps && first + n <= args.slots);
  unit_t* dst = static_cast<unit_t*>(side.cache) + b * side.cache_stride[0] + h * side.cache_stride[1] +
                first * side.cache_stride[2];
  const unit_t* src = static_cast<const unit_t*>(side.states) + b * side.states_stride[0] + h * side.states_stride[1];
  for (int64_t t0 = blockIdx.y * args.rows_per_block; t0 < n; t0 += gridDim.y * args.rows_per_block) {
    const int64_t units = ((t0 + args.rows_per_block < n ? t0 + args.rows_per_block : n) - t0) * args.row_units;
    for (int64_t i = threadIdx.x; i < units; i += blockDim.x) {
      const int64_t t = t0 + i / args.row_units, d = i % args.row_units;
      dst[t * side.cache_stride[2] + d] = src[t * side.states_stride[2] + d];
    }
  }
}

// The widest copy unit that divides every base address, B/H/S/T stride and Dh row. Two
// bytes always do: every supported dtype is at least that wide.
int64_t unit_bytes(const at::Tensor* const (&tensors)[4]) {
  const int64_t size = tensors[0]->element_size();
  for (int64_t unit : {16, 8, 4}) {
    bool fits = (tensors[0]->size(3) * size) % unit == 0;
    for (const at::Tensor* t : tensors) {
      fits = fits && reinterpret_cast<std::uintptr_t>(t->data_ptr()) % unit == 0;
      for (int64_t d = 0; d < 3; ++d) fits = fits && (t->stride(d) * size) % unit == 0;
    }
    if (fits) return unit;
  }
  return 2;
}

CopySide copy_side(const at::Tensor& cache, const at::Tensor& states, int64_t unit) {
  const int64_t size = cache.element_size();
  return {cache.mutable_data_ptr(),
          states.const_data_ptr(),
          {cache.stride(0) * size / unit, cache.stride(1) * size / unit, cache.stride(2) * size / unit},
          {states.stride(0) * size / unit, states.stride(1) * size / unit, states.stride(2) * size / unit}};
}

template <typename unit_t>
void launch(const CopyArgs& args, int64_t tasks, cudaStream_t stream) {
  const int64_t chunks = (args.steps + args.rows_per_block - 1) / args.rows_per_block;
  const dim3 grid(static_cast<unsigned>(tasks), static_cast<unsigned>(std::min(chunks, kMaxGridY)));
  ragged_cache_write_kernel<unit_t><<<grid, kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void ragged_cache_write_cuda(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_states,
                             const at::Tensor& value_states, const at::Tensor& start, const at::Tensor& count) {
  check_ragged_cache_write_args(key_cache, value_cache, key_states, value_states, start, count);
  TORCH_CHECK(key_cache.is_cuda(), "hcr::ragged_cache_write_ (CUDA kernel): tensors must be on a CUDA device");
  const int64_t tasks = 2 * key_cache.size(0) * key_cache.size(1);
  if (tasks == 0 || key_states.size(2) == 0 || key_cache.size(3) == 0) return;
  TORCH_CHECK(tasks <= std::numeric_limits<int32_t>::max(), "hcr::ragged_cache_write_: B * H = ", tasks / 2,
              " is too large for one launch");
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const at::Tensor* const tensors[4] = {&key_cache, &value_cache, &key_states, &value_states};
  const int64_t unit = unit_bytes(tensors);
  CopyArgs args{};
  args.side[0] = copy_side(key_cache, key_states, unit);
  args.side[1] = copy_side(value_cache, value_states, unit);
  args.start = start.const_data_ptr<int64_t>();
  args.count = count.const_data_ptr<int64_t>();
  args.heads = key_cache.size(1);
  args.slots = key_cache.size(2);
  args.steps = key_states.size(2);
  args.row_units = key_cache.size(3) * key_cache.element_size() / unit;
  args.rows_per_block = std::max<int64_t>(1, kUnitsPerBlock / args.row_units);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (unit) {
    case 16: launch<uint4>(args, tasks, stream); break;
    case 8: launch<uint2>(args, tasks, stream); break;
    case 4: launch<uint32_t>(args, tasks, stream); break;
    default: launch<uint16_t>(args, tasks, stream); break;
  }
}

}  // namespace hcr

TORCH_LIBRARY_IMPL(hcr, CUDA, m) { m.impl("ragged_cache_write_", &hcr::ragged_cache_write_cuda); }
