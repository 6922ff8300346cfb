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

#include "cpu_isa.h"

// Vector arguments of always-inlined helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define HCR_INLINE inline __attribute__((always_inline))

namespace hcr {

// exp(x), ~2 ulp: Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-6
// polynomial, and 2^k from the exponent bits. Inputs below -87.3 give 0 (as
// expf does); inputs above 88.7 saturate. Written once for a scalar type T and
// for GCC vector types, so the hot loops need no compiler auto-vectorisation
// of branches (which GCC declines for floating-point selects).
template <typename F, typename I>
HCR_INLINE F exp_approx_t(F x) {
  const F lo = F{} - 87.3f, hi = F{} + 88.7f;  // splats of the right type
  const F clamped = x < lo ? lo : (x > hi ? hi : x);
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
template <int Lanes>
HCR_INLINE vfloat<Lanes> exp_v(vfloat<Lanes> x) {
  return exp_approx_t<vfloat<Lanes>, vint<Lanes>>(x);
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
  const vfloat<Lanes> e = exp_v<Lanes>(x < zero ? x : -x);
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
