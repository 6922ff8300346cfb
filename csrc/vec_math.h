// Vectorised float math shared by the CPU kernels: exp, sigmoid, softplus on
// GCC vector types (16 lanes), and HCR_MULTIVERSION, which compiles a hot function
// for AVX-512, AVX2+FMA and baseline x86-64 and picks one at load time.
//
// GCC declines to auto-vectorise loops whose floating-point selects it cannot
// if-convert; writing the math once for scalar and vector types sidesteps that.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace hcr {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HCR_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HCR_MULTIVERSION
#endif

// exp(x), ~2 ulp: Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-6
// polynomial, and 2^k from the exponent bits. Inputs below -87.3 give 0 (as
// expf does); inputs above 88.7 saturate. Written once for a scalar type T and
// for GCC vector types, so the hot loops need no compiler auto-vectorisation
// of branches (which GCC declines for floating-point selects).
template <typename F, typename I>
inline __attribute__((always_inline)) F exp_approx_t(F x) {
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

inline __attribute__((always_inline)) float exp_approx(float x) { return exp_approx_t<float, int32_t>(x); }

// 16 lanes: one AVX-512 register, two AVX2 or four SSE registers.
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

template <typename F>
inline __attribute__((always_inline)) F sigmoid_t(F x) {
  return 1.f / (1.f + exp_approx_t<F, std::conditional_t<std::is_same_v<F, float>, int32_t, vint>>(-x));
}

// out[i] = sigmoid(in[i]) for i < n: whole vectors, then a scalar tail.
inline __attribute__((always_inline)) void sigmoid_array(const float* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_v(out + i, sigmoid_t(load_v(in + i)));
  for (; i < n; ++i) out[i] = sigmoid_t(in[i]);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(e / (2 + e))
// as an odd series in s = e / (2 + e) <= 1/3 (error < 1e-7).
inline __attribute__((always_inline)) vfloat softplus_v(vfloat x) {
  const vfloat zero = vfloat{};
  const vfloat e = exp_approx_t<vfloat, vint>(x < zero ? x : -x);
  const vfloat s = e / (e + 2.f), s2 = s * s;
  vfloat p = s2 * (1.f / 13.f) + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return (x > zero ? x : zero) + 2.f * s * p;
}

}  // namespace hcr
