// What the extension's CUDA part was built with, for hcr_kernels._C.build_info()
// (hcr_ops.cpp): kept apart from the ops' kernels so no op owns it.
#include <cuda_runtime_api.h>

namespace hcr {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace hcr
