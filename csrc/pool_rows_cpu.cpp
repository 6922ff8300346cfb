// CPU kernels of hcr::pool_rows_ / hcr::pool_rows_backward_: one pass over the
// output rows, parallel over rows (at::parallel_for), fp32 accumulation (fp64 for
// fp64) in a per-thread row buffer so the inner loops vectorise for every dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "pool_rows.h"

namespace hcr {
namespace {

// Rows per parallel task: enough work per task to amortise scheduling.
int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems));
}

template <typename scalar_t>
void pool_rows_kernel(const scalar_t* template_, const int64_t* window_of_row, const scalar_t* hidden,
                      scalar_t* out, int64_t rows, int64_t windows, int64_t W, int64_t D) {
  at::parallel_for(0, rows, grain_rows(W * D), [&](int64_t begin, int64_t end) {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> acc(D);
    const acc_t count = static_cast<acc_t>(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t w = window_of_row[r];
      scalar_t* dst = out + r * D;
      if (w < 0) {
        TORCH_CHECK(template_ != nullptr, "hcr::pool_rows: row ", r, " has no window and no template_");
        std::memcpy(dst, template_ + r * D, D * sizeof(scalar_t));
        continue;
      }
      TORCH_CHECK(w < windows, "hcr::pool_rows: row ", r, " refers to window ", w, " of ", windows);
      const scalar_t* src = hidden + w * W * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<acc_t>(src[d]);
      for (int64_t k = 1; k < W; ++k) {
        const scalar_t* row = src + k * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
      }
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] / count);
    }
  });
}

template <typename scalar_t>
void pool_rows_backward_kernel(const scalar_t* grad_out, const int64_t* window_of_row, scalar_t* grad_hidden,
                               scalar_t* grad_template, int64_t rows, int64_t windows, int64_t W, int64_t D) {
  at::parallel_for(0, rows, grain_rows(W * D), [&](int64_t begin, int64_t end) {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t> share(D);
    const acc_t count = static_cast<acc_t>(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t w = window_of_row[r];
      const scalar_t* g = grad_out + r * D;
      if (w < 0) {
        if (grad_template != nullptr) std::memcpy(grad_template + r * D, g, D * sizeof(scalar_t));
        continue;
      }
      TORCH_CHECK(w < windows, "hcr::pool_rows_backward: row ", r, " refers to window ", w, " of ", windows);
      if (grad_template != nullptr) std::memset(grad_template + r * D, 0, D * sizeof(scalar_t));
      for (int64_t d = 0; d < D; ++d) share[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) / count);
      scalar_t* dst = grad_hidden + w * W * D;
      for (int64_t k = 0; k < W; ++k) std::memcpy(dst + k * D, share.data(), D * sizeof(scalar_t));
    }
  });
}

}  // namespace

void pool_rows_cpu(const std::optional<at::Tensor>& template_, const at::Tensor& window_of_row,
                   const at::Tensor& hidden, const at::Tensor& out) {
  check_pool_rows_args(template_, window_of_row, hidden, out);
  TORCH_CHECK(out.device().is_cpu(), "hcr::pool_rows_ (CPU kernel): tensors must be on the CPU");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hcr::pool_rows_", [&] {
    pool_rows_kernel<scalar_t>(template_.has_value() ? template_->const_data_ptr<scalar_t>() : nullptr,
                               window_of_row.const_data_ptr<int64_t>(), hidden.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<scalar_t>(), out.size(0), hidden.size(0), hidden.size(1),
                               hidden.size(2));
  });
}

void pool_rows_backward_cpu(const at::Tensor& grad_out, const at::Tensor& window_of_row, const at::Tensor& grad_hidden,
                            const std::optional<at::Tensor>& grad_template) {
  check_pool_rows_backward_args(grad_out, window_of_row, grad_hidden, grad_template);
  TORCH_CHECK(grad_out.device().is_cpu(), "hcr::pool_rows_backward_ (CPU kernel): tensors must be on the CPU");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "hcr::pool_rows_backward_", [&] {
    pool_rows_backward_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), window_of_row.const_data_ptr<int64_t>(),
        grad_hidden.mutable_data_ptr<scalar_t>(),
        grad_template.has_value() ? grad_template->mutable_data_ptr<scalar_t>() : nullptr, grad_out.size(0),
        grad_hidden.size(0), grad_hidden.size(1), grad_hidden.size(2));
  });
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def("pool_rows_(Tensor? template_, Tensor window_of_row, Tensor hidden, Tensor(a!) out) -> ()");
  m.def(
      "pool_rows_backward_(Tensor grad_out, Tensor window_of_row, Tensor(a!) grad_hidden, "
      "Tensor(b!)? grad_template) -> ()");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) {
  m.impl("pool_rows_", &hcr::pool_rows_cpu);
  m.impl("pool_rows_backward_", &hcr::pool_rows_backward_cpu);
}
