// The Python module hcr_kernels._C and the torch.library namespace "hcr".
//
// Each op declares its schema next to its CPU kernels (<op>_cpu.cpp, with
// TORCH_LIBRARY_FRAGMENT) and registers its CUDA kernels in <op>_cuda.cu, so the
// ops are reachable as torch.ops.hcr.* with their mutation annotations and adding
// an op touches no shared file.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu_isa.h"
#include "decode_ops.h"

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

// Choices worked out once per layer (hcr_kernels.decode_linear's native_buckets: for which row counts a weight
// takes the native kernel), kept in a table keyed by everything such a choice depends on, read here from the
// weight and the process: its device, dtype, sizes and whether its rows are contiguous, the active CPU ISA,
// torch's thread count and the values of the environment variables named by set_weight_choice_environment. A
// direct decode_linear call looks its choice up in one call: 0.46 us with its Python on the Intel Xeon, where
// building that key in Python took 1.7-1.9 us, more than the rest of its dispatch. The GIL serialises every call.
std::vector<std::string>& weight_choice_environment() {
  static std::vector<std::string> names;
  return names;
}

std::unordered_map<std::string, int64_t>& weight_choices() {
  static std::unordered_map<std::string, int64_t> table;
  return table;
}

// The table's key for `weight`, or nullopt for a layout without strides (such a weight is never kept).
std::optional<std::string> weight_choice_key(const at::Tensor& weight) {
  if (weight.layout() != at::kStrided || weight.dim() == 0) return std::nullopt;
  std::string key;
  const auto put = [&key](int64_t value) { key.append(reinterpret_cast<const char*>(&value), sizeof(value)); };
  put(static_cast<int64_t>(weight.device().type()));
  put(weight.device().index());
  put(static_cast<int64_t>(weight.scalar_type()));
  put(weight.dim());
  for (int64_t size : weight.sizes()) put(size);
  put(weight.size(-1) <= 1 || weight.stride(-1) == 1);  // rows contiguous, as native_buckets reads it
  put(static_cast<int64_t>(hcr::active_isa()));
  put(at::get_num_threads());
  for (const std::string& name : weight_choice_environment()) {
    const char* value = std::getenv(name.c_str());
    put(value == nullptr ? -1 : static_cast<int64_t>(std::strlen(value)));  // unset differs from empty
    if (value != nullptr) key.append(value);
  }
  return key;
}

// The choice kept for weights like `weight` in this process's state, else nullopt.
std::optional<int64_t> remembered_choice(const at::Tensor& weight) {
  const std::optional<std::string> key = weight_choice_key(weight);
  if (!key) return std::nullopt;
  const auto found = weight_choices().find(*key);
  return found == weight_choices().end() ? std::nullopt : std::optional<int64_t>(found->second);
}

// The tensor behind `object` when it is a plain dense CPU tensor (or a Parameter), else nullptr. Anything else goes
// through torch's own dispatch, where it can mean something else: a subclass (__torch_function__,
// __torch_dispatch__: FakeTensor), a tensor that torch.func wraps (vmap's batched tensors are of type Tensor), a
// conjugate or negative view.
const at::Tensor* plain_cpu_tensor(pybind11::handle object) {
  if (!THPVariable_CheckExact(object.ptr())) return nullptr;
  const at::Tensor& tensor = THPVariable_Unpack(object.ptr());
  static const c10::DispatchKeySet plain{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                         c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};
  const c10::DispatchKeySet keys = tensor.key_set();
  return tensor.layout() == at::kStrided && (keys & plain) == keys ? &tensor : nullptr;
}

// A direct decode_linear call whose answer is already known, in one call from Python (hcr_kernels.decode_linear's
// decode_linear and apply_decode_linear): `input @ weight.T + bias` through the native kernel where `buckets` (for
// None, the choice remembered for this weight, see weight_choices) takes it at this input's row count, through
// at::linear where it does not; None where nothing is known or anything is unusual (a tensor that is not a plain
// CPU one, shapes or dtypes that do not fit, weight rows not contiguous, empty sums, a gradient asked of the
// native kernel), and the Python path decides, with its checks that name what is wrong. Its Python (checks, the
// choice, the autograd test, the dispatcher's boxing) had cost more than the kernel on a small layer: AMD EPYC
// (Zen 3), 2 threads, 1 x 32 fp32 weight, 6.9-8.1 us a call (automatic choice, named "native") against 2.6-2.9 us
// for the op alone and 3.5 us for F.linear; in one call 1.5-1.8 us.
pybind11::object decode_linear_chosen(pybind11::handle input, pybind11::handle weight, pybind11::handle bias,
                                      std::optional<int64_t> buckets) {
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled()) {
    return pybind11::none();  // a mode in force sees every op: the dispatcher's path
  }
  const at::Tensor* x = plain_cpu_tensor(input);
  const at::Tensor* w = plain_cpu_tensor(weight);
  const at::Tensor* b = bias.is_none() ? nullptr : plain_cpu_tensor(bias);
  if (x == nullptr || w == nullptr || (b == nullptr && !bias.is_none())) return pybind11::none();
  if (w->dim() != 2 || x->dim() == 0 || x->size(-1) != w->size(1) || w->size(1) == 0 || x->numel() == 0) {
    return pybind11::none();
  }
  const auto dtype = w->scalar_type();
  const bool native_dtype = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!native_dtype || x->scalar_type() != dtype || (w->size(1) > 1 && w->stride(1) != 1)) return pybind11::none();
  if (b != nullptr && (b->dim() != 1 || b->size(0) != w->size(0) || b->scalar_type() != dtype)) {
    return pybind11::none();
  }
  const std::optional<int64_t> mask = buckets ? buckets : remembered_choice(*w);
  if (!mask) return pybind11::none();
  const bool native = hcr::takes_native(x->numel() / w->size(1), *mask);
  const bool grad = at::GradMode::is_enabled() && (x->requires_grad() || w->requires_grad() ||
                                                   (b != nullptr && b->requires_grad()));
  if (native && grad) return pybind11::none();  // the autograd Function's
  const c10::optional<at::Tensor> bias_tensor = b != nullptr ? c10::optional<at::Tensor>(*b) : c10::nullopt;
  at::Tensor out;
  {
    pybind11::gil_scoped_release released;
    if (native) {
      RECORD_FUNCTION("hcr::decode_linear", std::vector<c10::IValue>({*x, *w}));  // as the op shows in a profile
      out = hcr::decode_linear_cpu(*x, *w, bias_tensor);
    } else {
      out = at::linear(*x, *w, bias_tensor);
    }
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
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
  m.def("set_weight_choice_environment", [](std::vector<std::string> names) {
        weight_choice_environment() = std::move(names);
        weight_choices().clear();
      }, "The environment variables a weight's remembered choice depends on (clears the table)",
      pybind11::arg("names"));
  m.def("weight_choice", &remembered_choice,
        "The choice remembered for a weight like this one in this process's state, else None", pybind11::arg("weight"));
  m.def("remember_weight_choice", [](const at::Tensor& weight, int64_t choice) {
        if (const std::optional<std::string> key = weight_choice_key(weight)) weight_choices()[*key] = choice;
      }, "Remember a choice for weights like this one in this process's state", pybind11::arg("weight"),
      pybind11::arg("choice"));
  m.def("decode_linear_chosen", &decode_linear_chosen,
        "input @ weight.T + bias where the choice of path is known (buckets, or None: the weight's remembered one), "
        "else None", pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("buckets"));
  m.def("forget_weight_choices", [] { weight_choices().clear(); }, "Drop every remembered weight choice");
  // Read by hcr_kernels.decode_attention (BLOCK_QUERIES), so Python never restates the kernel's constant.
  m.attr("DECODE_ATTENTION_BLOCK_QUERIES") = hcr::decode_attention_block_queries();
  m.def("decode_attention_chunk_slots", &hcr::decode_attention_chunk_slots,
        "Slots of a span decode_attention's CPU kernel takes per chunk, for cache rows of row_bytes (this core's L2)",
        pybind11::arg("row_bytes"));
  m.def("decode_attention_set_chunk_slots", &hcr::decode_attention_set_chunk_slots,
        "For tests: decode_attention's CPU kernel takes spans in chunks of this many slots (0: its L2 rule)",
        pybind11::arg("slots"));
}
