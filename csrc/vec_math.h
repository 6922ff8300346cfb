// Vectorised float math shared by the CPU kernels: exp, sigmoid, softplus, written
// once for scalars and for GCC vector types of any width, so each ISA variant of a
// kernel (cpu_isa.h) uses vectors of its own register width.
//
// GCC declines to auto-vectorise loops whose floating-point selects it cannot
// if-convert; writing the math once for scalar and vector types sidesteps that.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_isa.h"

// Vector arguments of always-inlined helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define HCR_INLINE inline __attribute__((always_inline))
// The same for a lambda (after its parameter list): inlined into its caller, it is compiled for the caller's ISA.
#define HCR_LAMBDA_INLINE __attribute__((always_inline))

namespace hcr {

// exp(x), ~2 ulp: Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-6
// polynomial, and 2^k from the exponent bits. Inputs below -87.3 give 0 (as
// expf does); inputs above 88.7 saturate. Written once for a scalar type T and
// for GCC vector types, so the hot loops need no compiler auto-vectorisation
// of branches (which GCC declines for floating-point selects). NonPositive: for
// x <= 0 only (a softmax's x - max), without the clamp (the last select already
// gives 0 below -87.3, whatever the arithmetic made of such x): the same bits.
template <typename F, typename I, bool NonPositive = false>
HCR_INLINE F exp_approx_t(F x) {
  const F lo = F{} - 87.3f, hi = F{} + 88.7f;  // splats of the right type
  F clamped = x;
  if constexpr (!NonPositive) clamped = x < lo ? lo : (x > hi ? hi : x);
  const F t = clamped * 1.44269504088896341f + 12582912.f;  // round to nearest via 1.5 * 2^23
  const F kf = t - 12582912.f;
  F r = clamped - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I k;
  if constexpr (std::is_same_v<F, float>) {
    k = static_cast<I>(kf);
  } else {
    k = __builtin_convertvector(kf, I);
  }
  const I bits = (k + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? F{} : p * scale;
}

HCR_INLINE float exp_approx(float x) { return exp_approx_t<float, int32_t>(x); }

// `Lanes` floats (or int32s): one register of the ISA variant being compiled; `Lanes`
// raw 16-bit values (bf16/fp16 bits) and their 32-bit widening.
template <int Lanes>
struct Vec {
  typedef float f __attribute__((vector_size(4 * Lanes)));
  typedef int32_t i __attribute__((vector_size(4 * Lanes)));
  typedef uint16_t u16 __attribute__((vector_size(2 * Lanes)));
  typedef uint32_t u32 __attribute__((vector_size(4 * Lanes)));
};
template <int Lanes>
using vfloat = typename Vec<Lanes>::f;
template <int Lanes>
using vint = typename Vec<Lanes>::i;

template <int Lanes>
HCR_INLINE vfloat<Lanes> load_v(const float* p) {
  vfloat<Lanes> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int Lanes>
HCR_INLINE void store_v(float* p, vfloat<Lanes> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int Lanes>
HCR_INLINE float lane_sum(vfloat<Lanes> v) {
  float total = 0.0f;
  for (int i = 0; i < Lanes; ++i) total += v[i];
  return total;
}
// The sum of a vector's lanes by halving (log2(Lanes) vector adds): for sums taken once
// per short dot product, where lane_sum's one-lane-at-a-time chain would cost more
// than the dot product itself. The order of the additions differs from lane_sum's.
template <int Lanes>
HCR_INLINE float halving_sum(vfloat<Lanes> v) {
  if constexpr (Lanes == 1) {
    return v[0];
  } else {
    vfloat<Lanes / 2> low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
    return halving_sum<Lanes / 2>(low + high);
  }
}

// Asks for the Lines 64-byte lines from p (Locality as __builtin_prefetch's). Unrolled: written as a loop, the
// AVX2 path took 1.15-1.2x the time with its one line a sweep (Intel Xeon, one layer's 1.5B caches in the L2).
template <int Lines, int Locality, typename T>
HCR_INLINE void prefetch_lines(const T* p) {
  const char* bytes = reinterpret_cast<const char*>(p);
  [&]<int... Line>(std::integer_sequence<int, Line...>) HCR_LAMBDA_INLINE {
    (__builtin_prefetch(bytes + 64 * Line, 0, Locality), ...);
  }(std::make_integer_sequence<int, Lines>{});
}

// Asks for the 64-byte lines that a sweep's step of 2 * Lanes values of T, at offset i of each of Rows rows (stride
// elements apart from p), starts: the prefetch a sweep makes as it reaches each line (16-bit values on AVX2 start
// one every other step, fp32 on AVX-512 two a step).
template <typename T, int Lanes, int Rows, int Locality>
HCR_INLINE void prefetch_step_lines(const T* p, int64_t stride, int64_t i) {
  constexpr int step_bytes = 2 * Lanes * int(sizeof(T)), lines = step_bytes > 64 ? step_bytes / 64 : 1;
  if ((i * int64_t(sizeof(T))) % 64 != 0) return;
  for (int r = 0; r < Rows; ++r) prefetch_lines<lines, Locality>(p + r * stride + i);
}

// Lane `out` of one half of a pair fold (`pair_fold`) at group size Seg: each input holds
// Lanes / Seg groups of Seg partial sums, one group per original vector; the output holds
// twice as many groups of Seg / 2, the first input's groups first. `High` picks the upper
// half of each group (the lower half is the other operand of the add).
template <int Lanes, int Seg, bool High>
constexpr int pair_fold_lane(int out) {
  const int half = Seg / 2, groups = Lanes / Seg, group = out / half;
  const bool second = group >= groups;
  return (second ? Lanes : 0) + (second ? group - groups : group) * Seg + out % half + (High ? half : 0);
}
template <int Lanes, int Seg, bool High, int... Out>
HCR_INLINE vint<Lanes> pair_fold_mask(std::integer_sequence<int, Out...>) {
  return vint<Lanes>{pair_fold_lane<Lanes, Seg, High>(Out)...};
}
// Halves each group of partial sums of a and b and packs both into one vector (2 shuffles, 1 add).
template <int Lanes, int Seg>
HCR_INLINE vfloat<Lanes> pair_fold(vfloat<Lanes> a, vfloat<Lanes> b) {
  constexpr auto lanes = std::make_integer_sequence<int, Lanes>{};
  return __builtin_shuffle(a, b, pair_fold_mask<Lanes, Seg, false>(lanes)) +
         __builtin_shuffle(a, b, pair_fold_mask<Lanes, Seg, true>(lanes));
}

// transposed_sums (below) of 8 vectors of 8 lanes (AVX2's whole fold) with no lane-crossing shuffle after the first
// level: the halves of v[j] and v[j + 4] fold together (each result's 128-bit halves are then the two vectors'
// partial sums), so the next two levels are shuffles within 128-bit halves (vshufps) and the sums come out in
// order. Each lane adds the same partial sums as the generic folds, so every sum is bit for bit the same; the
// generic order packs the groups across halves at every level, which GCC compiled to vpermd with index vectors
// loaded from memory and blends. Side by side (AVX2 EPYC, Zen 3, 2 threads, both behind a temporary switch in one
// build, alternating in one process, 15-20 rounds; time generic / this): decode_attention one 1.5B bf16 task 1.03,
// 1.04, the 1.5B bf16 step B 1 1.015, 1.021, B 8 1.027, 1.025, the tiny model at 1,700 slots 0.98, 0.98, 1.01, 1.00
// (T = 6 1.03); decode_linear 1.5B bf16 8 rows 1.01, tiny fp32 8 rows 1.02. Not measured on an Intel CPU.
HCR_INLINE vfloat<8> transposed_sums_of_8(vfloat<8>* v) {
  using idx = vint<8>;
  vfloat<8> halves[4];  // halves[j]: v[j]'s 4 half sums in the low 128 bits, v[j + 4]'s in the high
  for (int j = 0; j < 4; ++j) {
    halves[j] = __builtin_shuffle(v[j], v[j + 4], idx{0, 1, 2, 3, 8, 9, 10, 11}) +
                __builtin_shuffle(v[j], v[j + 4], idx{4, 5, 6, 7, 12, 13, 14, 15});
  }
  vfloat<8> quarters[2];  // quarters[i]: the 2 quarter sums of v[2i], v[2i + 1] low, of v[2i + 4], v[2i + 5] high
  for (int i = 0; i < 2; ++i) {
    quarters[i] = __builtin_shuffle(halves[2 * i], halves[2 * i + 1], idx{0, 1, 8, 9, 4, 5, 12, 13}) +
                  __builtin_shuffle(halves[2 * i], halves[2 * i + 1], idx{2, 3, 10, 11, 6, 7, 14, 15});
  }
  return __builtin_shuffle(quarters[0], quarters[1], idx{0, 2, 8, 10, 4, 6, 12, 14}) +
         __builtin_shuffle(quarters[0], quarters[1], idx{1, 3, 9, 11, 5, 7, 13, 15});
}

// Lane j of the result is the sum of v[j]'s lanes, for Count vectors at once (v is
// overwritten; Count a power of two up to Lanes, all of them by default): pair folds in
// log2(Lanes) levels, about 3 vector ops per sum where a halving_sum each costs
// 2 log2(Lanes) plus a store per lane. For many short dot products (one query against a
// block of keys, a tile of weight rows times input rows). With fewer than Lanes vectors
// the last levels fold the one vector left with itself: lanes Count and up are copies.
// Order of additions: the halving order of halving_sum, whatever Count, so a sum does
// not depend on which other sums share its fold.
template <int Lanes, int Seg = Lanes, int Count = Seg>
HCR_INLINE vfloat<Lanes> transposed_sums(vfloat<Lanes>* v) {
  static_assert(Count >= 1 && Count <= Seg && (Count & (Count - 1)) == 0, "Count: a power of two up to Seg");
  if constexpr (Lanes == 8 && Seg == 8 && Count == 8) {
    return transposed_sums_of_8(v);
  } else if constexpr (Seg == 1) {
    return v[0];
  } else if constexpr (Count == 1) {
    v[0] = pair_fold<Lanes, Seg>(v[0], v[0]);
    return transposed_sums<Lanes, Seg / 2, 1>(v);
  } else {
    for (int i = 0; i < Count / 2; ++i) v[i] = pair_fold<Lanes, Seg>(v[2 * i], v[2 * i + 1]);
    return transposed_sums<Lanes, Seg / 2, Count / 2>(v);
  }
}

template <int Lanes>
HCR_INLINE vfloat<Lanes> exp_v(vfloat<Lanes> x) {
  return exp_approx_t<vfloat<Lanes>, vint<Lanes>>(x);
}
// exp_v for x <= 0 (see exp_approx_t): four instructions fewer per vector.
template <int Lanes>
HCR_INLINE vfloat<Lanes> exp_nonpositive_v(vfloat<Lanes> x) {
  return exp_approx_t<vfloat<Lanes>, vint<Lanes>, true>(x);
}

template <int Lanes>
using vu16 = typename Vec<Lanes>::u16;
template <int Lanes>
using vu32 = typename Vec<Lanes>::u32;

template <int Lanes>
HCR_INLINE vfloat<Lanes> bits_to_float(vu32<Lanes> bits) {
  vfloat<Lanes> out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// 16-bit lanes zero-extended to 32 bits. The AVX2 and AVX-512 variants use one vpmovzxwd
// (inline asm, as halves_to_float below: GCC 12 lowered __builtin_convertvector of these
// vectors to two half-width extends, a shift and an insert, five instructions where one
// does; in decode_attention's loops over bf16 caches that widening was a third of the
// instructions). The baseline keeps the generic conversion.
template <int Lanes>
HCR_INLINE vu32<Lanes> zero_extend_u16(vu16<Lanes> bits) {
#if HCR_HAS_ISA_VARIANTS
  if constexpr (Lanes == 8 || Lanes == 16) {
    vu32<Lanes> out;
    asm("vpmovzxwd %1, %0" : "=v"(out) : "vm"(bits));
    return out;
  }
#endif
  return __builtin_convertvector(bits, vu32<Lanes>);
}

// IEEE halves to fp32. The AVX2 (8 lanes) and AVX-512 (16 lanes) variants use the
// F16C instruction vcvtph2ps, one instruction per vector: GCC 12 scalarises
// __builtin_convertvector of _Float16 vectors, and the intrinsics cannot be inlined
// into these target-less templates, so it is written as inline asm. That is sound
// because a vector of 8 or 16 lanes only ever runs in the variant of its ISA
// (cpu_isa.h), which has F16C; used elsewhere, the asm fails to compile rather than
// run. The halves may be a memory operand, so GCC folds their load into the instruction: on an AMD EPYC
// (Zen 4) a loop of conversions and FMAs over 512 KiB of fp16 weights in the L2 (scratch C, one thread)
// took 7.6 us with the loads folded and 11.7 us with a separate load each; compare_builds (2 threads, 8
// pairs, time folded / not): the tiny model's one-row fp16 matrices 0.874 on the AVX2 path and 0.959 on
// avx512_bf16, 8 rows 0.980 / 0.971, its fp16 decode_attention step at 1,700 slots 0.920 / 0.984. The
// baseline (4 lanes, no F16C) converts with integer vector ops: move
// exponent and mantissa into place and rebias the exponent; halves with exponent 31
// (inf, nan) get the fp32 maximum exponent, subnormals are renormalised by one fp32
// subtraction.
template <int Lanes>
HCR_INLINE vfloat<Lanes> halves_to_float(vu16<Lanes> halves) {
#if HCR_HAS_ISA_VARIANTS
  if constexpr (Lanes == 8 || Lanes == 16) {
    vfloat<Lanes> out;
    asm("vcvtph2ps %1, %0" : "=v"(out) : "vm"(halves));
    return out;
  }
#endif
  using u32 = vu32<Lanes>;
  const u32 h = zero_extend_u16<Lanes>(halves);
  const u32 shifted = (h & 0x7fffu) << 13;  // exponent and mantissa, in fp32 position
  const u32 exponent = shifted & (0x7c00u << 13);
  const u32 normal = shifted + ((127u - 15u) << 23);
  const u32 special = normal + ((128u - 16u) << 23);  // inf / nan
  const vfloat<Lanes> subnormal = bits_to_float<Lanes>(normal + (1u << 23)) - bits_to_float<Lanes>(u32{} + (113u << 23));
  u32 subnormal_bits;
  std::memcpy(&subnormal_bits, &subnormal, sizeof(subnormal_bits));
  const u32 magnitude = exponent == (0x7c00u << 13) ? special : (exponent == 0u ? subnormal_bits : normal);
  return bits_to_float<Lanes>(magnitude | ((h & 0x8000u) << 16));
}

// `Lanes` consecutive values as fp32, from fp32, bf16 (the high half of an fp32) or fp16 storage.
template <typename T, int Lanes>
HCR_INLINE vfloat<Lanes> load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load_v<Lanes>(p);
  } else {
    vu16<Lanes> bits;
    std::memcpy(&bits, p, sizeof(bits));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return bits_to_float<Lanes>(zero_extend_u16<Lanes>(bits) << 16);
    } else {
      return halves_to_float<Lanes>(bits);
    }
  }
}

// Half `half` (0 or 1) of the 2 * Lanes values at p as fp32, in the order each storage widens
// fastest: fp32 and fp16 the first and the second Lanes values; bf16 the values at even and at
// odd offsets, widened from one 32-bit load by a shift (even) or a mask (odd), with no lane
// shuffle (a bf16 is the high half of an fp32). Sums over the 2 * Lanes values do not depend on
// the order, so a dot product takes both operands in it (widen_paired stores rows so), and an
// elementwise sum keeps it until the result is written back (store_paired). Callers pass a
// constant `half` (unrolled loops), so the choice folds away.
template <typename T, int Lanes>
HCR_INLINE vfloat<Lanes> load_pair_half(const T* p, int half) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    vu32<Lanes> bits;
    std::memcpy(&bits, p, sizeof(bits));
    return bits_to_float<Lanes>(half == 0 ? bits << 16 : bits & 0xffff0000u);
  } else {
    return load_as_float<T, Lanes>(p + half * Lanes);
  }
}

// out[i] = float(in[i]) for i < n, in storage order.
template <typename T, int Lanes>
HCR_INLINE void widen_to_float(const T* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) store_v<Lanes>(out + i, load_as_float<T, Lanes>(in + i));
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

// A row of n values as fp32 in the paired order: each whole block of 2 * Lanes in load_pair_half's
// order, the rest as stored.
template <typename T, int Lanes>
HCR_INLINE void widen_paired(const T* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 2 * Lanes <= n; i += 2 * Lanes) {
    store_v<Lanes>(out + i, load_pair_half<T, Lanes>(in + i, 0));
    store_v<Lanes>(out + i + Lanes, load_pair_half<T, Lanes>(in + i, 1));
  }
  widen_to_float<T, Lanes>(in + i, out + i, n - i);
}

// `Lanes` fp32 values into fp32, bf16 or fp16 storage, each rounded to nearest even as
// c10's scalar conversions round (bf16 NaN -> 0x7fc0 as there). fp16 uses the F16C
// instruction vcvtps2ph on the AVX2 and AVX-512 variants (inline asm, for the reason
// given at halves_to_float) and c10's scalar conversion on the baseline.
template <typename T, int Lanes>
HCR_INLINE void store_from_float(T* p, vfloat<Lanes> v) {
  if constexpr (std::is_same_v<T, float>) {
    store_v<Lanes>(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    vu32<Lanes> bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const vu32<Lanes> rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const vu32<Lanes> narrowed = (bits & 0x7fffffffu) > 0x7f800000u ? vu32<Lanes>{} + 0x7fc0u : rounded;
    const vu16<Lanes> halves = __builtin_convertvector(narrowed, vu16<Lanes>);
    std::memcpy(p, &halves, sizeof(halves));
  } else {
#if HCR_HAS_ISA_VARIANTS
    if constexpr (Lanes == 8 || Lanes == 16) {
      vu16<Lanes> halves;
      asm("vcvtps2ph $0, %1, %0" : "=v"(halves) : "v"(v));
      std::memcpy(p, &halves, sizeof(halves));
      return;
    }
#endif
    for (int i = 0; i < Lanes; ++i) p[i] = static_cast<T>(v[i]);
  }
}

// Lane k of the interleaving of a and b (a[0], b[0], a[1], b[1], ...), from lane Offset on.
template <int Lanes, int Offset, int... Out>
HCR_INLINE vint<Lanes> interleave_mask(std::integer_sequence<int, Out...>) {
  return vint<Lanes>{((Offset + Out) % 2 * Lanes + (Offset + Out) / 2)...};
}

// out[0, n) = scale * row[0, n) in storage order, rounded as store_from_float, for a row of fp32 in
// widen_paired's order (bf16 pairs are interleaved back: two shuffles per 2 * Lanes values).
template <typename T, int Lanes>
HCR_INLINE void store_paired(const float* row, float scale, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + 2 * Lanes <= n; i += 2 * Lanes) {
    vfloat<Lanes> first = load_v<Lanes>(row + i) * scale, second = load_v<Lanes>(row + i + Lanes) * scale;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      constexpr auto lanes = std::make_integer_sequence<int, Lanes>{};
      const vfloat<Lanes> low = __builtin_shuffle(first, second, interleave_mask<Lanes, 0>(lanes));
      second = __builtin_shuffle(first, second, interleave_mask<Lanes, Lanes>(lanes));
      first = low;
    }
    store_from_float<T, Lanes>(out + i, first);
    store_from_float<T, Lanes>(out + i + Lanes, second);
  }
  for (; i + Lanes <= n; i += Lanes) store_from_float<T, Lanes>(out + i, load_v<Lanes>(row + i) * scale);
  for (; i < n; ++i) out[i] = static_cast<T>(row[i] * scale);
}

HCR_INLINE float sigmoid(float x) { return 1.f / (1.f + exp_approx(-x)); }
template <int Lanes>
HCR_INLINE vfloat<Lanes> sigmoid_v(vfloat<Lanes> x) {
  return 1.f / (1.f + exp_v<Lanes>(-x));
}

// out[i] = sigmoid(in[i]) for i < n: whole vectors, then a scalar tail.
struct SigmoidArray {
  template <int Lanes>
  static HCR_INLINE void run(const float* in, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + Lanes <= n; i += Lanes) store_v<Lanes>(out + i, sigmoid_v<Lanes>(load_v<Lanes>(in + i)));
    for (; i < n; ++i) out[i] = sigmoid(in[i]);
  }
};

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(e / (2 + e))
// as an odd series in s = e / (2 + e) <= 1/3 (error < 1e-7).
template <int Lanes>
HCR_INLINE vfloat<Lanes> softplus_v(vfloat<Lanes> x) {
  const vfloat<Lanes> zero = vfloat<Lanes>{};
  const vfloat<Lanes> e = exp_nonpositive_v<Lanes>(x < zero ? x : -x);
  const vfloat<Lanes> s = e / (e + 2.f), s2 = s * s;
  vfloat<Lanes> p = s2 * (1.f / 13.f) + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return (x > zero ? x : zero) + 2.f * s * p;
}

}  // namespace hcr
