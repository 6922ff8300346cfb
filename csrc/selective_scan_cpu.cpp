// CPU selective scan (Mamba's S6 recurrence), forward and backward, fp32.
//
//   dt_t = softplus(delta_t + bias)            (or delta_t + bias)
//   x_t  = exp(dt_t * A) * x_{t-1} + dt_t * u_t * B_t      state [N] per channel
//   y_t  = <C_t, x_t> + D * u_t ;  out_t = y_t * silu(z_t)  (when z is given)
//
// Layout (the Python layer arranges it, mostly for free): u, delta, z, out are
// [batch, L, channels]; B, C are [batch, groups, L, N]; A is [channels, N].
// Work is split into tasks of (batch row, group, chunk of up to 32 channels):
// the chunk's state [N][32] stays in L1 and the inner loops run over channels,
// so they vectorise with no horizontal reductions (B_t, C_t are shared by the
// chunk). exp() is a branch-free polynomial on vectors of the ISA's register
// width; the hot functions are compiled for AVX-512, AVX2+FMA and baseline x86-64
// and run for the active ISA (cpu_isa.h).
//
// The forward saves the state at the end of every `segment` steps. The backward
// walks the segments in reverse: it recomputes one segment's states from the
// previous checkpoint into a buffer that fits in cache, then runs the reverse
// (adjoint) scan over it. No autograd graph, no per-step Python.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace hcr {
namespace {

constexpr int64_t kChunk = 32;     // channels per task
constexpr int64_t kMaxState = 256;  // largest N (mamba-ssm's limit too)

struct ScanShape {
  int64_t batch, length, channels, state, groups, segment;
  int64_t per_group() const { return channels / groups; }
  int64_t chunks_per_group() const { return (per_group() + kChunk - 1) / kChunk; }
  int64_t segments() const { return (length + segment - 1) / segment; }
};

struct ScanInputs {
  const float *u, *delta, *A, *B, *C, *D, *z, *bias;
  bool softplus;
};

// One task's view: batch row b, channels [c0, c0 + width) of group g.
struct Task {
  int64_t b, g, chunk, c0, width;
};

Task task_of(const ScanShape& s, int64_t index) {
  const int64_t chunk = index % s.chunks_per_group();
  const int64_t g = (index / s.chunks_per_group()) % s.groups;
  const int64_t b = index / (s.chunks_per_group() * s.groups);
  const int64_t c0 = g * s.per_group() + chunk * kChunk;
  return {b, g, chunk, c0, std::min(kChunk, (g + 1) * s.per_group() - c0)};
}

// A transposed to [N][chunk] for the chunk's channels.
void gather_A(const ScanInputs& in, const ScanShape& s, const Task& k, float* At) {
  for (int64_t n = 0; n < s.state; ++n)
    for (int64_t c = 0; c < k.width; ++c) At[n * kChunk + c] = in.A[(k.c0 + c) * s.state + n];
}

// dt of one step for a chunk, zero-padded delta lanes included: softplus(delta + bias).
struct ChunkDt {
  template <int Lanes>
  static HCR_INLINE void run(const ScanInputs& in, const ScanShape& s, const Task& k, int64_t t, float* dt_pad,
                             float* raw_pad) {
    static_assert(kChunk % Lanes == 0, "a chunk is a whole number of vectors");
    const float* delta_t = in.delta + (k.b * s.length + t) * s.channels + k.c0;
    for (int64_t c = 0; c < kChunk; ++c) raw_pad[c] = c < k.width ? delta_t[c] + in.bias[k.c0 + c] : 0.f;
    for (int64_t v = 0; v < kChunk; v += Lanes) {
      const vfloat<Lanes> raw = load_v<Lanes>(raw_pad + v);
      store_v<Lanes>(dt_pad + v, in.softplus ? softplus_v<Lanes>(raw) : raw);
    }
  }
};

// One recurrence step of a chunk: x <- exp(dt A) x + dt u B; y = <C, x>, on
// whole vectors of the (zero-padded) chunk; dt is padded to kChunk lanes. kRecord also stores exp(dt A), which
// the backward's recompute needs.
template <bool kRecord>
struct ScanStep {
  template <int Lanes>
  static HCR_INLINE void run(const float* __restrict__ At, const float* __restrict__ dt, const float* __restrict__ u_t,
                             const float* __restrict__ B_t, const float* __restrict__ C_t, float* __restrict__ x,
                             float* __restrict__ y, float* __restrict__ decay, int64_t state, int64_t width) {
    alignas(64) float dtu_pad[kChunk] = {0.f};
    for (int64_t c = 0; c < width; ++c) dtu_pad[c] = dt[c] * u_t[c];
    for (int64_t v = 0; v < kChunk; v += Lanes) {
      const vfloat<Lanes> dtv = load_v<Lanes>(dt + v), dtuv = load_v<Lanes>(dtu_pad + v);
      vfloat<Lanes> yv = vfloat<Lanes>{};
      for (int64_t n = 0; n < state; ++n) {
        const int64_t o = n * kChunk + v;
        const vfloat<Lanes> a = exp_v<Lanes>(dtv * load_v<Lanes>(At + o));
        const vfloat<Lanes> xn = a * load_v<Lanes>(x + o) + dtuv * B_t[n];
        store_v<Lanes>(x + o, xn);
        yv += xn * C_t[n];
        if constexpr (kRecord) store_v<Lanes>(decay + o, a);
      }
      store_v<Lanes>(y + v, yv);
    }
  }
};

void store_state(const ScanShape& s, const Task& k, const float* x, float* dst_bnd /* [N][channels] */) {
  for (int64_t n = 0; n < s.state; ++n)
    std::memcpy(dst_bnd + n * s.channels + k.c0, x + n * kChunk, k.width * sizeof(float));
}

void load_state(const ScanShape& s, const Task& k, const float* src_bnd, float* x) {
  for (int64_t n = 0; n < s.state; ++n)
    std::memcpy(x + n * kChunk, src_bnd + n * s.channels + k.c0, k.width * sizeof(float));
}

void forward_task(const ScanInputs& in, const ScanShape& s, const Task& k, float* out, float* checkpoints) {
  std::vector<float> At(s.state * kChunk), x(s.state * kChunk, 0.f);
  alignas(64) float y[kChunk], dt[kChunk], raw[kChunk], gate[kChunk];
  gather_A(in, s, k, At.data());
  const float* D = in.D + k.c0;
  for (int64_t t = 0; t < s.length; ++t) {
    const int64_t row = (k.b * s.length + t) * s.channels + k.c0;
    const int64_t bc = ((k.b * s.groups + k.g) * s.length + t) * s.state;
    const float* u_t = in.u + row;
    run_for_active_isa<ChunkDt>(in, s, k, t, dt, raw);
    run_for_active_isa<ScanStep<false>>(At.data(), dt, u_t, in.B + bc, in.C + bc, x.data(), y, nullptr, s.state,
                                        k.width);
    float* out_t = out + row;
    if (in.z) {
      const float* z_t = in.z + row;
      run_for_active_isa<SigmoidArray>(z_t, gate, k.width);
      for (int64_t c = 0; c < k.width; ++c) out_t[c] = (y[c] + D[c] * u_t[c]) * z_t[c] * gate[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < k.width; ++c) out_t[c] = y[c] + D[c] * u_t[c];
    }
    if ((t + 1) % s.segment == 0 || t + 1 == s.length)
      store_state(s, k, x.data(), checkpoints + (k.b * s.segments() + t / s.segment) * s.state * s.channels);
  }
}

struct ScanGrads {
  float *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *dbias;  // dA, dD, dbias: per batch row; dB, dC: per chunk
};

// The adjoint of one step, for a chunk: consumes carry = exp(dt_{t+1} A) * h_{t+1}
// and leaves carry = exp(dt_t A) * h_t, where h_t = dL/dx_t.
struct AdjointStep {
  template <int Lanes>
  static HCR_INLINE void run(const float* __restrict__ At, const float* __restrict__ dt, const float* __restrict__ u_t,
                             const float* __restrict__ gy, const float* __restrict__ B_t, const float* __restrict__ C_t,
                             const float* __restrict__ x_t, const float* __restrict__ x_prev,
                             const float* __restrict__ decay, float* __restrict__ carry, float* __restrict__ du,
                             float* __restrict__ ddt, float* __restrict__ dA, float* __restrict__ dB_t,
                             float* __restrict__ dC_t, int64_t state, int64_t width) {
    float dtu[kChunk];
    for (int64_t c = 0; c < width; ++c) dtu[c] = dt[c] * u_t[c];
    for (int64_t n = 0; n < state; ++n) {
      const float Bn = B_t[n], Cn = C_t[n];
      const int64_t o = n * kChunk;
      float dBn = 0.f, dCn = 0.f;
#pragma omp simd reduction(+ : dBn, dCn)
      for (int64_t c = 0; c < width; ++c) {
        const float h = carry[o + c] + gy[c] * Cn;
        const float a = decay[o + c];
        const float xp = x_prev ? x_prev[o + c] : 0.f;
        du[c] += h * dt[c] * Bn;
        ddt[c] += h * (u_t[c] * Bn + xp * At[o + c] * a);
        dA[o + c] += h * xp * dt[c] * a;
        dBn += h * dtu[c];
        dCn += gy[c] * x_t[o + c];
        carry[o + c] = a * h;
      }
      dB_t[n] = dBn;
      dC_t[n] = dCn;
    }
  }
};

void backward_task(const ScanInputs& in, const ScanShape& s, const Task& k, const float* grad_out,
                   const float* checkpoints, const float* grad_last_state, const ScanGrads& grads) {
  const int64_t N = s.state, W = kChunk, seg = s.segment;
  std::vector<float> At(N * W), carry(N * W, 0.f), dA(N * W, 0.f);
  std::vector<float> xs(seg * N * W), decays(seg * N * W), ys(seg * W), dts(seg * W), raws(seg * W), x0(N * W);
  float gy[kChunk], du[kChunk], ddt[kChunk], gate[kChunk], dD[kChunk] = {0.f}, dbias[kChunk] = {0.f};
  gather_A(in, s, k, At.data());
  if (grad_last_state) load_state(s, k, grad_last_state + k.b * N * s.channels, carry.data());
  // dB, dC partial sums of this chunk: [batch, groups, chunks, L, N]
  const int64_t part = ((k.b * s.groups + k.g) * s.chunks_per_group() + k.chunk) * s.length * N;

  for (int64_t sg = s.segments() - 1; sg >= 0; --sg) {
    const int64_t t0 = sg * seg, t1 = std::min(s.length, t0 + seg);
    if (sg == 0)
      std::fill(x0.begin(), x0.end(), 0.f);
    else
      load_state(s, k, checkpoints + (k.b * s.segments() + sg - 1) * N * s.channels, x0.data());
    // Recompute the segment: states, decays, y and dt of every step.
    std::vector<float> x(x0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - t0;
      const int64_t row = (k.b * s.length + t) * s.channels + k.c0;
      const int64_t bc = ((k.b * s.groups + k.g) * s.length + t) * N;
      run_for_active_isa<ChunkDt>(in, s, k, t, dts.data() + i * W, raws.data() + i * W);
      run_for_active_isa<ScanStep<true>>(At.data(), dts.data() + i * W, in.u + row, in.B + bc, in.C + bc, x.data(),
                                         ys.data() + i * W, decays.data() + i * N * W, N, k.width);
      std::memcpy(xs.data() + i * N * W, x.data(), N * W * sizeof(float));
    }
    // Reverse scan over the segment.
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      const int64_t row = (k.b * s.length + t) * s.channels + k.c0;
      const int64_t bc = ((k.b * s.groups + k.g) * s.length + t) * N;
      const float* u_t = in.u + row;
      if (in.z) run_for_active_isa<SigmoidArray>(in.z + row, gate, k.width);
      for (int64_t c = 0; c < k.width; ++c) {
        const float g = grad_out[row + c];
        const float Dc = in.D[k.c0 + c];
        const float pre = ys[i * W + c] + Dc * u_t[c];
        if (in.z) {
          const float zc = in.z[row + c], sz = gate[c];
          gy[c] = g * zc * sz;
          grads.dz[row + c] = g * pre * sz * (1.f + zc * (1.f - sz));
        } else {
          gy[c] = g;
        }
        dD[c] += gy[c] * u_t[c];
        du[c] = gy[c] * Dc;
        ddt[c] = 0.f;
      }
      const float* x_prev = i > 0 ? xs.data() + (i - 1) * N * W : x0.data();
      run_for_active_isa<AdjointStep>(At.data(), dts.data() + i * W, u_t, gy, in.B + bc, in.C + bc,
                                      xs.data() + i * N * W, x_prev, decays.data() + i * N * W, carry.data(), du, ddt,
                                      dA.data(), grads.dB + part + t * N, grads.dC + part + t * N, N, k.width);
      if (in.softplus) run_for_active_isa<SigmoidArray>(raws.data() + i * W, gate, k.width);  // d softplus / d raw
      for (int64_t c = 0; c < k.width; ++c) {
        const float dd = in.softplus ? ddt[c] * gate[c] : ddt[c];
        grads.ddelta[row + c] = dd;
        dbias[c] += dd;
      }
      std::memcpy(grads.du + row, du, k.width * sizeof(float));
    }
  }
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(grads.dA + (k.b * N + n) * s.channels + k.c0, dA.data() + n * W, k.width * sizeof(float));
  std::memcpy(grads.dD + k.b * s.channels + k.c0, dD, k.width * sizeof(float));
  std::memcpy(grads.dbias + k.b * s.channels + k.c0, dbias, k.width * sizeof(float));
}

void check_float_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "hcr::selective_scan (CPU kernel): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "hcr::selective_scan (CPU kernel): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "hcr::selective_scan (CPU kernel): ", name, " must be contiguous");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "hcr::selective_scan: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// Checks every input; returns the problem's sizes.
ScanShape check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const at::Tensor& D, const std::optional<at::Tensor>& z,
                       const at::Tensor& delta_bias, int64_t segment) {
  TORCH_CHECK(u.dim() == 3, "hcr::selective_scan: u must be [batch, L, channels], got ", u.sizes());
  TORCH_CHECK(A.dim() == 2, "hcr::selective_scan: A must be [channels, N], got ", A.sizes());
  TORCH_CHECK(B.dim() == 4, "hcr::selective_scan: B must be [batch, groups, L, N], got ", B.sizes());
  TORCH_CHECK(segment >= 1, "hcr::selective_scan: segment must be >= 1, got ", segment);
  ScanShape s{u.size(0), u.size(1), u.size(2), A.size(1), B.size(1), segment};
  TORCH_CHECK(s.state >= 1 && s.state <= kMaxState, "hcr::selective_scan: the state size N must be in [1, ",
              kMaxState, "], got ", s.state);
  TORCH_CHECK(s.groups >= 1 && s.channels % s.groups == 0, "hcr::selective_scan: channels (", s.channels,
              ") must be a multiple of the number of groups (", s.groups, ")");
  check_shape(delta, u.sizes(), "delta");
  check_shape(A, {s.channels, s.state}, "A");
  check_shape(B, {s.batch, s.groups, s.length, s.state}, "B");
  check_shape(C, {s.batch, s.groups, s.length, s.state}, "C");
  check_shape(D, {s.channels}, "D");
  check_shape(delta_bias, {s.channels}, "delta_bias");
  for (auto [t, name] : {std::pair{&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}, {&D, "D"},
                         {&delta_bias, "delta_bias"}})
    check_float_contiguous(*t, name);
  if (z.has_value()) {
    check_shape(*z, u.sizes(), "z");
    check_float_contiguous(*z, "z");
  }
  return s;
}

ScanInputs inputs_of(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const at::Tensor& D, const std::optional<at::Tensor>& z,
                     const at::Tensor& delta_bias, bool delta_softplus) {
  return {u.const_data_ptr<float>(),
          delta.const_data_ptr<float>(),
          A.const_data_ptr<float>(),
          B.const_data_ptr<float>(),
          C.const_data_ptr<float>(),
          D.const_data_ptr<float>(),
          z.has_value() ? z->const_data_ptr<float>() : nullptr,
          delta_bias.const_data_ptr<float>(),
          delta_softplus};
}

int64_t task_count(const ScanShape& s) { return s.batch * s.groups * s.chunks_per_group(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                          const at::Tensor& A, const at::Tensor& B,
                                                          const at::Tensor& C, const at::Tensor& D,
                                                          const std::optional<at::Tensor>& z,
                                                          const at::Tensor& delta_bias, bool delta_softplus,
                                                          int64_t segment) {
  const ScanShape s = check_inputs(u, delta, A, B, C, D, z, delta_bias, segment);
  const ScanInputs in = inputs_of(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  at::Tensor out = at::empty_like(u);
  at::Tensor checkpoints = at::empty({s.batch, s.segments(), s.state, s.channels}, u.options());
  float* out_ptr = out.mutable_data_ptr<float>();
  float* ckpt_ptr = checkpoints.mutable_data_ptr<float>();
  at::parallel_for(0, task_count(s), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) forward_task(in, s, task_of(s, i), out_ptr, ckpt_ptr);
  });
  return {out, checkpoints};
}

std::vector<at::Tensor> selective_scan_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& u,
                                               const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                                               const at::Tensor& C, const at::Tensor& D,
                                               const std::optional<at::Tensor>& z, const at::Tensor& delta_bias,
                                               bool delta_softplus, int64_t segment, const at::Tensor& checkpoints,
                                               const std::optional<at::Tensor>& grad_last_state) {
  const ScanShape s = check_inputs(u, delta, A, B, C, D, z, delta_bias, segment);
  check_shape(grad_out, u.sizes(), "grad_out");
  check_float_contiguous(grad_out, "grad_out");
  check_shape(checkpoints, {s.batch, s.segments(), s.state, s.channels}, "checkpoints");
  check_float_contiguous(checkpoints, "checkpoints");
  if (grad_last_state.has_value()) {
    check_shape(*grad_last_state, {s.batch, s.state, s.channels}, "grad_last_state");
    check_float_contiguous(*grad_last_state, "grad_last_state");
  }
  const ScanInputs in = inputs_of(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  at::Tensor dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dA = at::empty({s.batch, s.state, s.channels}, u.options());
  at::Tensor dB = at::empty({s.batch, s.groups, s.chunks_per_group(), s.length, s.state}, u.options());
  at::Tensor dC = at::empty_like(dB);
  at::Tensor dD = at::empty({s.batch, s.channels}, u.options()), dbias = at::empty_like(dD);
  const ScanGrads grads{du.mutable_data_ptr<float>(),
                        ddelta.mutable_data_ptr<float>(),
                        z.has_value() ? dz.mutable_data_ptr<float>() : nullptr,
                        dA.mutable_data_ptr<float>(),
                        dB.mutable_data_ptr<float>(),
                        dC.mutable_data_ptr<float>(),
                        dD.mutable_data_ptr<float>(),
                        dbias.mutable_data_ptr<float>()};
  const float* go = grad_out.const_data_ptr<float>();
  const float* ck = checkpoints.const_data_ptr<float>();
  const float* gl = grad_last_state.has_value() ? grad_last_state->const_data_ptr<float>() : nullptr;
  at::parallel_for(0, task_count(s), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) backward_task(in, s, task_of(s, i), go, ck, gl, grads);
  });
  return {du, ddelta, dz, dA, dB, dC, dD, dbias};
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor? z, "
      "Tensor delta_bias, bool delta_softplus, int segment) -> (Tensor out, Tensor checkpoints)");
  m.def(
      "selective_scan_bwd(Tensor grad_out, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor? z, Tensor delta_bias, bool delta_softplus, int segment, Tensor checkpoints, "
      "Tensor? grad_last_state) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) {
  m.impl("selective_scan_fwd", &hcr::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &hcr::selective_scan_bwd_cpu);
}
