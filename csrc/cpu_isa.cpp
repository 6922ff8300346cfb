// The active ISA of the CPU kernels (see cpu_isa.h): detected once, switchable by name.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

#include <unistd.h>

#if HCR_HAS_ISA_VARIANTS
#include <cpuid.h>
#include <sys/syscall.h>
#endif

namespace hcr {
namespace {

#if HCR_HAS_ISA_VARIANTS
// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), and Linux's permission to use the tiles' 8 KiB
// of register state, which a process must ask for once (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA; without it the first tile instruction is a SIGILL). Asked at most once per process.
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__builtin_cpu_supports("x86-64-v4") || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// AVX512_BF16 (CPUID leaf 7 subleaf 1, EAX bit 5): vdpbf16ps, two bf16 products per fp32 lane.
bool avx512_bf16_usable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __builtin_cpu_supports("x86-64-v4") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5));
}
#endif

bool cpu_has(Isa isa) {
#if HCR_HAS_ISA_VARIANTS
  switch (isa) {
    case Isa::amx:
      return avx512_bf16_usable() && amx_usable();
    case Isa::avx512_bf16:
      return avx512_bf16_usable();
    case Isa::avx512:
      return __builtin_cpu_supports("x86-64-v4");
    case Isa::avx2:
      return __builtin_cpu_supports("x86-64-v3");
    default:
      return true;
  }
#else
  return isa == Isa::baseline;
#endif
}

constexpr Isa kEveryIsa[] = {Isa::amx, Isa::avx512_bf16, Isa::avx512, Isa::avx2, Isa::baseline};  // best first

Isa best_isa() {
  for (Isa isa : kEveryIsa)
    if (cpu_has(isa)) return isa;
  return Isa::baseline;
}

#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
constexpr int kL1dSize = _SC_LEVEL1_DCACHE_SIZE, kL2Size = _SC_LEVEL2_CACHE_SIZE;
#else
constexpr int kL1dSize = -1, kL2Size = -1;  // a libc whose sysconf has no cache sizes: the defaults
#endif

// The size sysconf reports for `name`, or `otherwise` where it reports none.
int64_t cache_bytes(int name, int64_t otherwise) {
  const long size = name < 0 ? -1 : sysconf(name);
  return size > 0 ? int64_t(size) : otherwise;
}

std::atomic<int>& active() {
  static std::atomic<int> value{static_cast<int>(best_isa())};
  return value;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx:
      return "amx";
    case Isa::avx512_bf16:
      return "avx512_bf16";
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (Isa isa : kEveryIsa)
    if (cpu_has(isa)) names.emplace_back(isa_name(isa));
  return names;
}

int64_t l1d_bytes() {
  static const int64_t bytes = cache_bytes(kL1dSize, int64_t(32) << 10);
  return bytes;
}

int64_t l2_bytes() {
  static const int64_t bytes = cache_bytes(kL2Size, int64_t(256) << 10);
  return bytes;
}

void set_active_isa(const std::string& name) {
  for (Isa isa : kEveryIsa) {
    if (name != isa_name(isa)) continue;
    std::string supported;
    for (const std::string& n : supported_isa_names()) supported += (supported.empty() ? "" : ", ") + n;
    TORCH_CHECK_VALUE(cpu_has(isa), "CPU ISA '", name, "' is not available on this CPU (or this build); it supports: ",
                      supported);
    active().store(static_cast<int>(isa), std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK_VALUE(false, "CPU ISA must be one of amx, avx512_bf16, avx512, avx2, baseline, got '", name, "'");
}

}  // namespace hcr
