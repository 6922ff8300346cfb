// Which x86 instruction set the CPU kernels run with, as an explicit choice.
//
// Every hot loop is written once, as `template <int Lanes> static run(...)` of a
// small kernel struct, on GCC vector types of `Lanes` floats. It is compiled three
// times, each for one ISA and with that ISA's register width: AVX-512 (x86-64-v4,
// 16 lanes), AVX2 + FMA + F16C (x86-64-v3, 8 lanes) and the x86-64 baseline (SSE2,
// 4 lanes). Vectors wider than the registers (16 lanes on AVX2) make GCC spill to
// the stack; that is why one width for all ISAs was slow on AVX2-only CPUs.
//
// `run_for_active_isa<Kernel>(args...)` calls the variant of the active ISA: the
// best the CPU has at load, or the one set by `set_active_isa` (hcr_kernels sets it
// from HCR_CPU_ISA; tests and benchmarks switch it to run every path the CPU has).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace hcr {

// Best last, so a larger value is a newer ISA (each level has what the ones below it have). `avx512_bf16` is
// AVX-512 plus AVX512_BF16's vdpbf16ps (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids): every kernel
// runs its AVX-512 variant, and decode_linear's bf16 rows and decode_attention's bf16 scores multiply bf16 pairs
// straight from memory (bf16_pairs.h) instead of widening them. `amx` is that plus Intel's AMX tiles (AMX-TILE and AMX-BF16, granted by the OS): the
// few kernels with a tile path (decode_attention's bf16 scores, decode_linear's bf16 rows; amx_tiles.h) take it.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

Isa active_isa();
const char* isa_name(Isa isa);
// The ISAs this CPU (and this build) can run, best first.
std::vector<std::string> supported_isa_names();
// Selects the ISA by name; an unknown name or one the CPU lacks is an error naming the supported ones.
void set_active_isa(const std::string& name);
// This core's L1 data cache and L2 in bytes, as the OS reports them (32 KiB and 256 KiB where it does not say):
// the sizes kernels cut their work to (decode_linear's pieces of K, decode_attention's slot blocks).
int64_t l1d_bytes();
int64_t l2_bytes();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HCR_HAS_ISA_VARIANTS 1
#define HCR_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define HCR_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
// A function of its own (not inlined into the Lanes templates) that uses the tile intrinsics.
#define HCR_TARGET_AMX __attribute__((target("arch=x86-64-v4,amx-tile,amx-bf16")))
#else
#define HCR_HAS_ISA_VARIANTS 0
#define HCR_TARGET_AVX512
#define HCR_TARGET_AVX2
#define HCR_TARGET_AMX
#endif

// One entry point per ISA; `Kernel::run` is always_inline, so each is compiled in its entry point's target.
template <typename Kernel, typename... Args>
HCR_TARGET_AVX512 auto run_avx512(Args&&... args) {
  return Kernel::template run<16>(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
HCR_TARGET_AVX2 auto run_avx2(Args&&... args) {
  return Kernel::template run<8>(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
auto run_baseline(Args&&... args) {
  return Kernel::template run<4>(std::forward<Args>(args)...);
}

template <typename Kernel, typename... Args>
inline auto run_for_active_isa(Args&&... args) {
#if HCR_HAS_ISA_VARIANTS
  switch (active_isa()) {
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512:
      return run_avx512<Kernel>(std::forward<Args>(args)...);
    case Isa::avx2:
      return run_avx2<Kernel>(std::forward<Args>(args)...);
    default:
      break;
  }
#endif
  return run_baseline<Kernel>(std::forward<Args>(args)...);
}

}  // namespace hcr
