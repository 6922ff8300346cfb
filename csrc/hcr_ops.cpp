// Operator schemas of the hcr library and the Python module hcr_kernels._C.
//
// The ops are registered with torch.library (TORCH_LIBRARY) so that they are
// reachable as torch.ops.hcr.* and carry their mutation annotations; the device
// kernels register themselves in pool_rows_cpu.cpp / pool_rows_cuda.cu.
#include <torch/extension.h>

#include <string>

#ifdef HCR_WITH_CUDA
namespace hcr {
int cuda_runtime_version();  // from pool_rows_cuda.cu
}
#endif

TORCH_LIBRARY(hcr, m) {
  m.def("pool_rows_(Tensor? template_, Tensor window_of_row, Tensor hidden, Tensor(a!) out) -> ()");
  m.def(
      "pool_rows_backward_(Tensor grad_out, Tensor window_of_row, Tensor(a!) grad_hidden, "
      "Tensor(b!)? grad_template) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef HCR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = hcr::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = pybind11::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of hcr (ops live in torch.ops.hcr)";
  m.def("build_info", &build_info, "What this build of the extension contains");
}
