// The Python module hcr_kernels._C and the torch.library namespace "hcr".
//
// Each op declares its schema next to its CPU kernels (<op>_cpu.cpp, with
// TORCH_LIBRARY_FRAGMENT) and registers its CUDA kernels in <op>_cuda.cu, so the
// ops are reachable as torch.ops.hcr.* with their mutation annotations and adding
// an op touches no shared file.
#include <torch/extension.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "cpu_isa.h"

namespace hcr {
int64_t decode_attention_block_queries();                // decode_attention_cpu.cpp
int64_t decode_attention_chunk_slots(int64_t row_bytes);  // decode_attention_cpu.cpp
void decode_attention_set_chunk_slots(int64_t slots);     // decode_attention_cpu.cpp
}

#ifdef HCR_WITH_CUDA
namespace hcr {
int cuda_runtime_version();  // build_info_cuda.cu
}
#endif


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
  m.def("cpu_isa", [] { return std::string(hcr::isa_name(hcr::active_isa())); },
        "The instruction set the CPU kernels run with: amx, avx512_bf16, avx512, avx2 or baseline");
  m.def("supported_cpu_isas", &hcr::supported_isa_names, "The instruction sets this CPU can run, best first");
  m.def("set_cpu_isa", &hcr::set_active_isa, "Run the CPU kernels with this instruction set", pybind11::arg("name"));
  // hcr_kernels._extension.environment_variable: os.environ.get without its KeyErrors, for per-call reads.
  m.def("environment_variable", [](const std::string& name) -> std::optional<std::string> {
        const char* value = std::getenv(name.c_str());
        return value == nullptr ? std::nullopt : std::optional<std::string>(value);
      }, "os.environ.get(name), faster when the variable is unset", pybind11::arg("name"));
  // Read by hcr_kernels.decode_attention (BLOCK_QUERIES), so Python never restates the kernel's constant.
  m.attr("DECODE_ATTENTION_BLOCK_QUERIES") = hcr::decode_attention_block_queries();
  m.def("decode_attention_chunk_slots", &hcr::decode_attention_chunk_slots,
        "Slots of a span decode_attention's CPU kernel takes per chunk, for cache rows of row_bytes (this core's L2)",
        pybind11::arg("row_bytes"));
  m.def("decode_attention_set_chunk_slots", &hcr::decode_attention_set_chunk_slots,
        "For tests: decode_attention's CPU kernel takes spans in chunks of this many slots (0: its L2 rule)",
        pybind11::arg("slots"));
}
