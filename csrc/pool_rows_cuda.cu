// CUDA kernels of hcr::pool_rows_ / hcr::pool_rows_backward_: one thread block
// per output row, threads striding over D, fp32 accumulation. Memory bound by
// design: each input element is read once and each output element written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pool_rows.h"

namespace hcr {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void pool_rows_cuda_kernel(const scalar_t* __restrict__ template_, const int64_t* __restrict__ window_of_row,
                                      const scalar_t* __restrict__ hidden, scalar_t* __restrict__ out, int64_t windows,
                                      int64_t W, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t w = window_of_row[r];
  scalar_t* dst = out + r * D;
  if (w < 0) {
    CUDA_KERNEL_ASSERT(template_ != nullptr);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = template_[r * D + d];
    return;
  }
  CUDA_KERNEL_ASSERT(w < windows);
  const scalar_t* src = hidden + w * W * D;
  const acc_t count = static_cast<acc_t>(W);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t k = 0; k < W; ++k) acc += static_cast<acc_t>(src[k * D + d]);
    dst[d] = static_cast<scalar_t>(acc / count);
  }
}

template <typename scalar_t>
__global__ void pool_rows_backward_cuda_kernel(const scalar_t* __restrict__ grad_out,
                                               const int64_t* __restrict__ window_of_row,
                                               scalar_t* __restrict__ grad_hidden, scalar_t* __restrict__ grad_template,
                                               int64_t windows, int64_t W, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t w = window_of_row[r];
  const scalar_t* g = grad_out + r * D;
  if (w < 0) {
    if (grad_template != nullptr)
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) grad_template[r * D + d] = g[d];
    return;
  }
  CUDA_KERNEL_ASSERT(w < windows);
  const acc_t count = static_cast<acc_t>(W);
  scalar_t* dst = grad_hidden + w * W * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const scalar_t share = static_cast<scalar_t>(static_cast<acc_t>(g[d]) / count);
    for (int64_t k = 0; k < W; ++k) dst[k * D + d] = share;
    if (grad_template != nullptr) grad_template[r * D + d] = scalar_t(0);
  }
}

int threads_for(int64_t D) {
  int threads = 32;
  while (threads < kThreads && threads < D) threads *= 2;
  return threads;
}

}  // namespace

void pool_rows_cuda(const std::optional<at::Tensor>& template_, const at::Tensor& window_of_row,
                    const at::Tensor& hidden, const at::Tensor& out) {
  check_pool_rows_args(template_, window_of_row, hidden, out);
  TORCH_CHECK(out.is_cuda(), "hcr::pool_rows_ (CUDA kernel): tensors must be on a CUDA device");
  const int64_t rows = out.size(0);
  if (rows == 0 || out.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hcr::pool_rows_", [&] {
    pool_rows_cuda_kernel<scalar_t><<<rows, threads_for(out.size(1)), 0, stream>>>(
        template_.has_value() ? template_->const_data_ptr<scalar_t>() : nullptr,
        window_of_row.const_data_ptr<int64_t>(), hidden.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        hidden.size(0), hidden.size(1), hidden.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pool_rows_backward_cuda(const at::Tensor& grad_out, const at::Tensor& window_of_row,
                             const at::Tensor& grad_hidden, const std::optional<at::Tensor>& grad_template) {
  check_pool_rows_backward_args(grad_out, window_of_row, grad_hidden, grad_template);
  TORCH_CHECK(grad_out.is_cuda(), "hcr::pool_rows_backward_ (CUDA kernel): tensors must be on a CUDA device");
  const int64_t rows = grad_out.size(0);
  if (rows == 0 || grad_out.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "hcr::pool_rows_backward_", [&] {
    pool_rows_backward_cuda_kernel<scalar_t><<<rows, threads_for(grad_out.size(1)), 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), window_of_row.const_data_ptr<int64_t>(),
        grad_hidden.mutable_data_ptr<scalar_t>(),
        grad_template.has_value() ? grad_template->mutable_data_ptr<scalar_t>() : nullptr, grad_hidden.size(0),
        grad_hidden.size(1), grad_hidden.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace hcr

TORCH_LIBRARY_IMPL(hcr, CUDA, m) {
  m.impl("pool_rows_", &hcr::pool_rows_cuda);
  m.impl("pool_rows_backward_", &hcr::pool_rows_backward_cuda);
}
