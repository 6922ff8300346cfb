// bf16 dot products in pairs (AVX512_BF16's vdpbf16ps), for decode_linear's bf16 rows on the avx512_bf16 and amx
// levels and decode_attention's pass 1 over bf16 caches on avx512_bf16 (cpu_isa.h).
//
// Why: a bf16 value is the high half of an fp32, so the AVX-512 loops widen each loaded bf16 vector into two fp32
// vectors and multiply those with two fp32 FMAs. vdpbf16ps takes 32 bf16 values of each operand as they are in
// memory and adds both products of each pair of neighbours to one fp32 lane: half the multiply instructions and
// no widening. Where a 512-bit FMA takes both 256-bit FMA pipes (AMD Zen 4) that can double the products a cycle;
// on the Intel Xeon measured here, vdpbf16ps did about as many products a cycle as the FMAs (decode_linear_cpu.cpp).
//
// Numerics: each product of two bf16 values is exact in fp32 and each sum is rounded to nearest even, as an FMA's
// is; unlike the FMA loops, the instruction reads subnormal bf16 values as zero and flushes subnormal sums (as
// the AMX tiles' tdpbf16ps does, and torch's own bf16 matmuls on such CPUs).
#pragma once

#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace hcr {

#if HCR_HAS_ISA_VARIANTS
// 32 bf16 values (their bits): one 512-bit register.
using bf16_pairs = vu16<32>;

HCR_INLINE bf16_pairs load_bf16_pairs(const uint16_t* p) {
  bf16_pairs v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// sums[j] += a[2j] * b[2j] + a[2j + 1] * b[2j + 1] for the 16 lanes j. Inline asm, as the F16C conversions in
// vec_math.h: the intrinsic cannot be inlined into the target-less Lanes templates, and this only ever runs on
// the levels whose CPUs have the instruction (a caller checks active_isa() >= Isa::avx512_bf16). Both operands
// in registers: allowed a memory operand, GCC folded each input vector's load into every weight row's
// instruction, reading the input rows from the L2 twice where they do not fit in the L1 (4 and 8 rows of the
// 1,536 x 8,960 down projection: 1.30-1.37x the time of the widened loop, against 1.00-1.07x). The sums go in
// as an input tied to the output, not as an in-out operand: with "+v" on an element of an array of sums
// (decode_attention's pass 1), GCC kept the whole array on the stack, loading and storing it around every
// instruction.
HCR_INLINE void add_pair_products(vfloat<16>& sums, bf16_pairs a, bf16_pairs b) {
  vfloat<16> out;
  asm("vdpbf16ps %3, %2, %0" : "=v"(out) : "0"(sums), "v"(a), "v"(b));
  sums = out;
}
#endif

}  // namespace hcr
