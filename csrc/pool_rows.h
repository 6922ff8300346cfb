// pool_rows: the one mechanism behind window_mean_pool and pool_scatter.
//
//   out[r] = mean_k hidden[window_of_row[r], k]   if window_of_row[r] >= 0
//   out[r] = template_[r]                          otherwise
//
// window_of_row (int64 [R]) is built by the Python layer: arange(N) for
// window_mean_pool, the row-major rank of each True slot (-1 elsewhere) for
// pool_scatter. The backward writes grad_hidden[w, k] = grad_out[r] / W and,
// when asked, grad_template (grad_out with the pooled rows zeroed).
#pragma once

#include <torch/types.h>

namespace hcr {

inline void check_pool_rows_args(const std::optional<at::Tensor>& template_,
                                 const at::Tensor& window_of_row,
                                 const at::Tensor& hidden,
                                 const at::Tensor& out) {
  TORCH_CHECK(hidden.dim() == 3, "hcr::pool_rows: hidden must be [N, W, D], got ", hidden.sizes());
  TORCH_CHECK(out.dim() == 2, "hcr::pool_rows: out must be [R, D], got ", out.sizes());
  TORCH_CHECK(window_of_row.dim() == 1 && window_of_row.scalar_type() == at::kLong,
              "hcr::pool_rows: window_of_row must be int64 [R], got ", window_of_row.scalar_type(),
              " ", window_of_row.sizes());
  TORCH_CHECK(window_of_row.size(0) == out.size(0), "hcr::pool_rows: window_of_row has ",
              window_of_row.size(0), " rows but out has ", out.size(0));
  TORCH_CHECK(hidden.size(2) == out.size(1), "hcr::pool_rows: hidden has D=", hidden.size(2),
              " but out has D=", out.size(1));
  TORCH_CHECK(hidden.scalar_type() == out.scalar_type(), "hcr::pool_rows: hidden is ",
              hidden.scalar_type(), " but out is ", out.scalar_type());
  TORCH_CHECK(hidden.is_contiguous() && out.is_contiguous() && window_of_row.is_contiguous(),
              "hcr::pool_rows: hidden, out and window_of_row must be contiguous");
  TORCH_CHECK(hidden.device() == out.device() && window_of_row.device() == out.device(),
              "hcr::pool_rows: all tensors must be on one device");
  if (template_.has_value()) {
    const at::Tensor& t = *template_;
    TORCH_CHECK(t.sizes() == out.sizes(), "hcr::pool_rows: template_ is ", t.sizes(),
                " but out is ", out.sizes());
    TORCH_CHECK(t.scalar_type() == out.scalar_type() && t.is_contiguous() && t.device() == out.device(),
                "hcr::pool_rows: template_ must be contiguous, on out's device, of out's dtype");
  }
}

inline void check_pool_rows_backward_args(const at::Tensor& grad_out,
                                          const at::Tensor& window_of_row,
                                          const at::Tensor& grad_hidden,
                                          const std::optional<at::Tensor>& grad_template) {
  check_pool_rows_args(grad_template, window_of_row, grad_hidden, grad_out);
  TORCH_CHECK(grad_hidden.size(1) > 0, "hcr::pool_rows_backward: the window W must be >= 1");
}

void pool_rows_cpu(const std::optional<at::Tensor>& template_, const at::Tensor& window_of_row,
                   const at::Tensor& hidden, const at::Tensor& out);
void pool_rows_backward_cpu(const at::Tensor& grad_out, const at::Tensor& window_of_row,
                            const at::Tensor& grad_hidden, const std::optional<at::Tensor>& grad_template);

}  // namespace hcr
