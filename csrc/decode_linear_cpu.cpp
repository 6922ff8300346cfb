// CPU kernel of hcr::decode_linear: out[m, n] = sum_k input[m, k] * weight[n, k] + bias[n]
// for a few input rows m (a decode step: one row per sequence of the batch).
//
// Why a kernel of our own: with one to a few rows, a linear layer reads every
// weight once and does two flops per weight, so its speed is how fast it streams
// the weights. On this project's AMD EPYCs the BLAS call F.linear reaches for M = 1
// (MKL sgemv) streamed them at about a third of what this plain vectorised loop gets;
// on an Intel Xeon MKL streams fp32 weights as fast as a copy and wins, while this loop
// still wins for 16-bit weights at 1-4 rows (benchmarks/test_bench_decode_linear.py).
// Which to take is measured per machine (hcr_kernels/decode_linear, autotune).
//
// Layout: input [..., K] (M rows in all), weight [N, K] (rows contiguous, any row
// stride), bias [N] or none, out [..., N] in the input's dtype. Parallel over output
// features: each thread takes a contiguous block of weight rows. The M input rows
// are converted to fp32 once (M * K floats, a few KiB, they stay in L1/L2); each
// weight row is loaded once per group of up to 4 input rows (with one to four weight
// rows a pass, weight_rows_per_pass), converted to fp32 in registers, and multiplied
// into 2 accumulators per pair of rows, whose lanes a pass sums all at once
// (transposed_sums). fp32 accumulation for fp32, bf16 and fp16; 16-bit sums are
// rounded into the output by the kernel's own vector stores and 16-bit inputs widened
// by its own loop (no fp32 staging tensor, no ATen conversion ops: a small layer's
// whole kernel takes a few microseconds, as long as an op's dispatch). The hot loop
// is compiled for AVX-512, AVX2 (+F16C) and the baseline, each with vectors of its
// register width (cpu_isa.h). On the avx512_bf16 level bf16 rows multiply bf16 pairs as
// stored (add_pair_blocks: vdpbf16ps, nothing widened); on the amx level they run on AMX
// tiles (bf16_rows_on_tiles), and in pairs where K is no multiple of a tile's 32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "bf16_pairs.h"
#include "decode_ops.h"
#include "vec_math.h"

namespace hcr {
namespace {

// How far ahead of the dot products each weight row is asked for, into the L2 (add_widened_steps, add_pair_blocks: the
// line a step starts, this many bytes further down the weights). Without it a pass's arithmetic and its wait for
// the weights added up: at 8 input rows the loop is about as long on its arithmetic as on its reads, and the
// hardware prefetcher alone did not keep the reads going beside it. Measured side by side (AMD EPYC, Zen 4, 2
// threads, the same build asking and not asking, alternating in one process, 12-15 rounds, the L3 read over
// before each call; time asking / not): 1.5B MLP bf16 8 rows 0.96 / 0.84 / 0.72 / 0.69 / 0.68 at 0.5 / 2 / 8 /
// 16 / 32 KiB ahead (0.89-0.90 into the L1 instead), again 0.69 / 0.69 / 0.66 at 16 / 32 / 64 KiB; 1 row 0.88-0.95
// at 8-64 KiB; fp32 1 row 0.92 / 0.92 / 0.96 at 16 / 32 / 64 KiB; 32 KiB on the AVX2 path bf16 8 rows 0.72, 1 row
// 0.79, fp32 1 row 0.92; the tiny model's 29 matrices (in the L3) fp32 1 / 8 rows 0.98 / 0.69, bf16 1.04 / 0.83,
// AVX2 path fp32 8 rows 0.96, bf16 1 row 1.02. On an AMD EPYC with AVX2 only (Zen 3, 512 KiB L2; the same
// way, 12-15 rounds): bf16 1 row 0.98 / 0.90 / 0.92 at 8 / 32 / 64 KiB, again 0.85 at 32 KiB; bf16 8 rows 0.96 /
// 1.04 / 1.04, again 0.95; fp32 1 row 1.04 / 0.97 / 0.96; tiny fp32 1 / 8 rows 0.96 / 0.94, tiny bf16 1 row 1.04.
// Asking past a matrix's end is harmless (a prefetch never faults). Not measured on an Intel CPU; the amx
// level's tile path does not ask.
constexpr int64_t kWeightPrefetchBytes = 32 << 10;

// Makes a and b opaque register values, so the compiler cannot fold their loads into the FMAs that use them.
// With two weight rows per pass GCC had loaded each input vector once per weight row (as an FMA's memory
// operand): the input rows, in the L2 at the 1.5B MLP's K, were then read twice as often as needed. Side by side
// (Intel Xeon, AVX-512, 2 threads, 3 alternations, time with / without): 1.5B MLP bf16 8 rows 0.82-0.92, tiny
// Qwen2 fp32 8 / 16 / 32 rows 0.93-0.96 / 0.89-0.94 / 0.90-0.91, bf16 and fp16 4-8 rows 0.93-0.98; one row
// (one weight row per pass: not asked) 0.95-1.05.
template <int Lanes>
HCR_INLINE void in_register(vfloat<Lanes>& a, vfloat<Lanes>& b) {
#if HCR_HAS_ISA_VARIANTS
  asm("" : "+v"(a), "+v"(b));
#endif
}

// The running sums of a tile of NR weight rows by R input rows: two chains of vectors per pair of rows, over
// alternate steps of k (even and odd). A row's values go to the same chains in the same order whatever pieces of
// k they are taken in (rows_in_pieces), so cutting K changes no bit of a result.
template <int NR, int R, int Lanes>
struct TileChains {
  vfloat<Lanes> even[NR][R], odd[NR][R];
};

// c += the products over values [k0, k1) of NR weight rows w_i = w + i * weight_stride and R input rows
// x_r = x + r * K (fp32 in widen_paired's order): bf16 weights widen as even and odd values (load_pair_half: a
// shift and a mask of one load, fewer instructions than widening two halves; side by side, 2 threads: 1.02-1.23x
// on the bf16 benchmark shapes, one row 1.18-1.23x, AVX-512 and AVX2 paths). Each weight vector is loaded and
// widened once for all R input rows, each input vector loaded once for all NR weight rows; with one input row
// each weight vector is widened where it is used, since held for the step the 2 NR widened vectors beside 2 NR
// sums overflowed AVX2's 16 registers and GCC kept them on the stack (AMD EPYC Zen 4 on its AVX2 path,
// compare_builds, 2 threads, 6 pairs: the tiny model's one-row fp16 matrices 0.914 [0.898-0.930] of the time;
// bf16 0.994, fp32 1.024, the 1.5B MLP's one bf16 / fp16 row from memory 1.020 / 0.997, on avx512_bf16
// 0.98-1.02: within the floor). Each step asks for the weights `ahead` values further on (kWeightPrefetchBytes,
// or the next block's rows in rows_in_pieces). k0 is a multiple of 64 (of any step), k1 one too or K, where the
// last single vectors go to the even chains (the scalar tail is widened_dots').
template <typename T, int NR, int R, int Lanes>
HCR_INLINE void add_widened_steps(TileChains<NR, R, Lanes>& c, const T* w, int64_t weight_stride, const float* x,
                                  int64_t k0, int64_t k1, int64_t K, int64_t ahead) {
  int64_t k = k0;
  for (; k + 2 * Lanes <= k1; k += 2 * Lanes) {
    prefetch_step_lines<T, Lanes, NR, 1>(w + ahead, weight_stride, k);
    if constexpr (R == 1) {  // each weight vector widened where it is used (above)
      const vfloat<Lanes> x0 = load_v<Lanes>(x + k), x1 = load_v<Lanes>(x + k + Lanes);
      for (int i = 0; i < NR; ++i) {
        c.even[i][0] += load_pair_half<T, Lanes>(w + i * weight_stride + k, 0) * x0;
        c.odd[i][0] += load_pair_half<T, Lanes>(w + i * weight_stride + k, 1) * x1;
      }
      continue;
    }
    vfloat<Lanes> w0[NR], w1[NR];
    for (int i = 0; i < NR; ++i) {
      w0[i] = load_pair_half<T, Lanes>(w + i * weight_stride + k, 0);
      w1[i] = load_pair_half<T, Lanes>(w + i * weight_stride + k, 1);
    }
    for (int r = 0; r < R; ++r) {
      vfloat<Lanes> x0 = load_v<Lanes>(x + r * K + k), x1 = load_v<Lanes>(x + r * K + k + Lanes);
      if constexpr (NR > 1) in_register<Lanes>(x0, x1);
      for (int i = 0; i < NR; ++i) {
        c.even[i][r] += w0[i] * x0;
        c.odd[i][r] += w1[i] * x1;
      }
    }
  }
  if (k1 < K) return;
  for (; k + Lanes <= K; k += Lanes) {
    vfloat<Lanes> w0[NR];
    for (int i = 0; i < NR; ++i) w0[i] = load_as_float<T, Lanes>(w + i * weight_stride + k);
    for (int r = 0; r < R; ++r) {
      const vfloat<Lanes> x0 = load_v<Lanes>(x + r * K + k);
      for (int i = 0; i < NR; ++i) c.even[i][r] += w0[i] * x0;
    }
  }
}

// dots[i * R + r]: each pair's two chains added, then the lanes of the tile's NR R sums in one transposed_sums
// (halving order whatever NR R: summed one lane at a time they had taken a fifth of the time at K = 1,536 and
// more at the tiny model's K = 256), then the scalar tail (the values past K's last whole vector), in fused
// multiply-adds written out: left to contraction, GCC fused them for some R and not others, and a row's result
// depended on its batch.
template <int NR, int R, int Lanes>
HCR_INLINE void chain_dots(const TileChains<NR, R, Lanes>& c, float* dots) {
  static_assert(NR * R <= Lanes, "chain_dots: one vector holds the tile's sums");
  vfloat<Lanes> pairs[NR * R];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) pairs[i * R + r] = c.even[i][r] + c.odd[i][r];
  const vfloat<Lanes> sums = transposed_sums<Lanes, Lanes, NR * R>(pairs);
  for (int j = 0; j < NR * R; ++j) dots[j] = sums[j];
}
template <typename T, int NR, int R, int Lanes>
HCR_INLINE void widened_dots(const TileChains<NR, R, Lanes>& c, const T* w, int64_t weight_stride, const float* x,
                             int64_t K, float* dots) {
  chain_dots(c, dots);
  for (int64_t k = K - K % Lanes; k < K; ++k) {
    for (int i = 0; i < NR; ++i) {
      const float wk = static_cast<float>(w[i * weight_stride + k]);
      for (int r = 0; r < R; ++r) dots[i * R + r] = std::fma(wk, x[r * K + k], dots[i * R + r]);
    }
  }
}

#if HCR_HAS_ISA_VARIANTS
// add_widened_steps for bf16 weights and bf16 input rows as they are stored, on the avx512_bf16 and amx levels
// (bf16_pairs.h): each 32 values of a weight row and of an input row are one vdpbf16ps, nothing widened, the
// rows' last partial block zero-padded (so every product goes through the instruction: subnormals read as zero
// wherever they sit). The two chains of a pair take alternate 32-value blocks: 2 NR R chains of the
// instruction's latency in flight (8 at one input row). Against the widened loop on the Intel Xeon (where
// vdpbf16ps does about as many products a cycle as its FMAs; both levels in one process, 2 threads, alternating,
// 15 rounds, median time pairs / widened): one row 0.81 with the weights in the L2 (512 x 1,536), 0.94-0.97 from
// memory (the 1.5B MLP's 8,960 x 1,536 and 1,536 x 8,960, 3 copies in turn); 2 rows 0.92 / 0.97; 4 rows 1.02 /
// 1.00; 8 rows 1.03 / 0.91-1.07 (amx takes tiles there instead). Written for CPUs whose 512-bit FMAs are half
// rate (AMD Zen 4), where the products a cycle may double.
template <int NR, int R>
HCR_INLINE void add_pair_blocks(TileChains<NR, R, 16>& c, const uint16_t* w, int64_t weight_stride,
                                const uint16_t* x, int64_t k0, int64_t k1, int64_t K, int64_t ahead) {
  // sums[i][r] += the products of 32 values of weight row i (rows w_stride apart) and input row r (x_stride apart);
  // `ask`: for the weights `ahead` values on (not past the copies of the last values)
  const auto block = [ahead](vfloat<16>(&sums)[NR][R], const uint16_t* w_at, int64_t w_stride, const uint16_t* x_at,
                             int64_t x_stride, bool ask = true) HCR_LAMBDA_INLINE {
    bf16_pairs weights[NR];
    for (int i = 0; i < NR; ++i) weights[i] = load_bf16_pairs(w_at + i * w_stride);
    if (ask)
      for (int i = 0; i < NR; ++i) __builtin_prefetch(w_at + i * w_stride + ahead, 0, 1);
    for (int r = 0; r < R; ++r) {
      const bf16_pairs inputs = load_bf16_pairs(x_at + r * x_stride);
      for (int i = 0; i < NR; ++i) add_pair_products(sums[i][r], weights[i], inputs);
    }
  };
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {
    block(c.even, w + k, weight_stride, x + k, K);
    block(c.odd, w + k + 32, weight_stride, x + k + 32, K);
  }
  if (k1 < K) return;
  if (k + 32 <= K) block(c.even, w + k, weight_stride, x + k, K), k += 32;
  if (k < K) {  // the rows' last values, zero-padded to a block
    uint16_t w_tail[NR][32] = {}, x_tail[R][32] = {};
    for (int i = 0; i < NR; ++i) std::memcpy(w_tail[i], w + i * weight_stride + k, (K - k) * sizeof(uint16_t));
    for (int r = 0; r < R; ++r) std::memcpy(x_tail[r], x + r * K + k, (K - k) * sizeof(uint16_t));
    block(c.odd, w_tail[0], 32, x_tail[0], 32, /*ask=*/false);
  }
}
#endif

// A tile's steps over values [k0, k1) (add_widened_steps), from input rows widened to fp32, or bf16 weights
// against bf16 input rows as stored (X = uint16_t, add_pair_blocks); and its dots once every value is in.
template <typename T, int NR, int R, int Lanes, typename X>
HCR_INLINE void add_tile_steps(TileChains<NR, R, Lanes>& c, const T* w, int64_t weight_stride, const X* x,
                               int64_t k0, int64_t k1, int64_t K, int64_t ahead) {
  if constexpr (std::is_same_v<X, float>) {
    add_widened_steps<T, NR, R, Lanes>(c, w, weight_stride, x, k0, k1, K, ahead);
  } else {
#if HCR_HAS_ISA_VARIANTS
    static_assert(std::is_same_v<T, c10::BFloat16> && Lanes == 16, "bf16 pairs: bf16 weights, AVX-512 loops");
    add_pair_blocks<NR, R>(c, reinterpret_cast<const uint16_t*>(w), weight_stride, x, k0, k1, K, ahead);
#endif
  }
}
template <typename T, int NR, int R, int Lanes, typename X>
HCR_INLINE void tile_dots_from(const TileChains<NR, R, Lanes>& c, const T* w, int64_t weight_stride, const X* x,
                               int64_t K, float* dots) {
  if constexpr (std::is_same_v<X, float>) {
    widened_dots<T, NR, R, Lanes>(c, w, weight_stride, x, K, dots);
  } else {
    chain_dots(c, dots);  // no scalar tail: the last block was zero-padded
  }
}

// dots[i * R + r] = <w_i, x_r> for NR weight rows and R input rows, one pass over the weight rows. Every pair sums
// in the same order whatever NR and R (its two chains over k, then the lanes, then the scalar tail), so a row's
// result does not depend on the batch it is in. Side by side (Intel Xeon, 2 threads, 5 alternations, time with /
// without the one transposed_sums): AVX-512 path tiny Qwen2 fp32 1 / 4 / 8 / 16 / 32 rows 0.90-1.01 / 0.79-0.91 /
// 0.71-0.83 / 0.64-0.78 / 0.59-0.68, bf16 and fp16 0.72-1.00, 1.5B MLP bf16 1 / 8 rows 0.78-1.08 / 0.81-1.07;
// AVX2 path 0.89-1.02 on the tiny model, 1.5B 1 row 0.68-0.91.
template <typename T, int NR, int R, int Lanes, typename X>
HCR_INLINE void tile_dots(const T* w, int64_t weight_stride, const X* x, int64_t K, float* dots) {
  TileChains<NR, R, Lanes> c = {};
  add_tile_steps<T, NR, R, Lanes>(c, w, weight_stride, x, 0, K, K, kWeightPrefetchBytes / int64_t(sizeof(T)));
  tile_dots_from<T, NR, R, Lanes>(c, w, weight_stride, x, K, dots);
}

// Weight rows a pass takes beside R input rows: as many as keep the 2 NR R accumulators,
// the NR pairs of weight vectors and an input pair in the vector registers (32 on
// AVX-512, 16 below), and NR R sums in one vector for transposed_sums. With 4 input rows,
// 2 weight rows on AVX-512 cut the loads per FMA from 5/4 to 6/8 where the rows make the
// loop compute-bound (1.1-1.4x at the 1.5B MLP's shapes with 4-8 rows in a side-by-side
// run, 0.97-1.02x on the tiny model's); AVX2's 16 registers hold one weight row's 8. One input
// row takes 4 weight rows on AVX2 as on AVX-512: 8 FMA chains (with 2 weight rows, 4 chains each
// waited on the FMA latency) and 4 weight streams in flight. Side by side (Intel Xeon on its AVX2 path,
// 2 threads, both builds in one process alternating, 2 runs, time 4 / 2 rows a pass, raw calls of
// copies in turn): 1.5B MLP bf16 8,960 x 1,536 x 3 copies 0.88, 0.77; x 12 (from memory) 0.89, 0.89;
// 1,536 x 8,960 0.76, 0.71; one copy (in the L3) 1.00, 0.84; fp16 0.91, 0.90; fp32 0.86, 0.91; the tiny
// model's 256 x 256 bf16 x 29 0.98, 0.99. Not measured on an AVX2 EPYC.
template <int R, int Lanes>
constexpr int weight_rows_per_pass() {
  if constexpr (Lanes >= 16) return R == 4 ? 2 : 4;
  return R == 4 ? 1 : (R == 1 ? 4 : 2);
}
// Weight rows taken together for all input rows (a multiple of every R's pass), so they are
// read from memory once and from the cache by the other groups of input rows.
template <int Lanes>
constexpr int kWeightRowsTogether = weight_rows_per_pass<1, Lanes>();

// sums[(m + r) * ld + i] = dots[i * R + r] + bias[i]: a tile's dots for NR weight rows and R input rows from m.
template <int NR, int R>
HCR_INLINE void dots_into_sums(const float* dots, const float* bias, int64_t m, float* sums, int64_t ld) {
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) sums[(m + r) * ld + i] = dots[i * R + r] + (bias != nullptr ? bias[i] : 0.0f);
}

// rows_from(std::integral_constant<int, R>{}, m) for the groups of R input rows from m: 4 at a time, then 2, then 1.
template <typename F>
HCR_INLINE void for_row_groups(int64_t M, const F& rows_from) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows_from(std::integral_constant<int, 4>{}, m);
  if (m + 2 <= M) rows_from(std::integral_constant<int, 2>{}, m), m += 2;
  if (m < M) rows_from(std::integral_constant<int, 1>{}, m);
}

// sums[m * ld + i] = <w_i, x_m> + bias[i] for NR weight rows and all M input rows, each group of input rows
// (for_row_groups) taking the weight rows weight_rows_per_pass at a time (NR one at a time: the rows left over).
template <typename T, int NR, int Lanes, typename X>
HCR_INLINE void weight_rows_times_inputs(const T* w, int64_t weight_stride, const X* x, const float* bias,
                                         int64_t M, int64_t K, float* sums, int64_t ld) {
  for_row_groups(M, [&](auto rows, int64_t m) HCR_LAMBDA_INLINE {
    constexpr int R = decltype(rows)::value;
    constexpr int per_pass = NR == 1 ? 1 : weight_rows_per_pass<R, Lanes>();
    static_assert(NR % per_pass == 0, "weight_rows_times_inputs: NR must be whole passes");
    for (int i = 0; i < NR; i += per_pass) {
      float dots[per_pass * R];
      tile_dots<T, per_pass, R, Lanes>(w + i * weight_stride, weight_stride, x + m * K, K, dots);
      dots_into_sums<per_pass, R>(dots, bias != nullptr ? bias + i : nullptr, m, sums + i, ld);
    }
  });
}

// Long rows in pieces of K. Where the input rows do not fit the L1 beside the weights (4 bf16 rows of the 1.5B MLP's
// down projection, K = 8,960: 70 KiB; or the groups of 4 rows that take turns on the same weight rows, 8 rows widened
// to fp32 at K = 1,536: 48 KiB), every pass read them again from the L2 beside the weights it streams: on an AMD
// EPYC (Zen 4, 32 KiB L1) 4 bf16 rows took 0.48 ns a vdpbf16ps at K >= 4,096 against 0.31 at K <= 2,048 (one
// thread, 8 MiB of weights in the L3). So blocks of kPieceRows weight rows take K a piece at a time: each piece of a
// group's input rows (half the L1, input_piece_values) is read from the L2 once for the whole block, each pass's
// chains are stored between pieces (a quarter of the L1 at 4 rows on AVX-512), and each step asks for the next
// block's weights at the same place (kPieceRows rows on: the order they will be read in; asking
// kWeightPrefetchBytes on would ask for rows of this block). The same sums in the same order: every bit as unpieced
// (tests/test_decode_linear.py, a row alone and in a batch). Taken where M rows of K values take more than the L1,
// from 2 rows: one row is read once per 4 weight rows, and cutting it was no faster. Alternating with an unpieced
// switch in one scratch build (Zen 4, 2 threads, the 1.5B MLP's three matrices in turn from memory, the L3 read
// over before each round, 15 rounds; time pieced / unpieced): avx512_bf16 bf16 4 / 8 rows 0.916-0.932 /
// 0.905-0.914 (the down projection 0.83 / 0.77-0.80); AVX2 path bf16 4 / 8 rows 0.865 / 0.761 (8 rows: gate and
// up 0.88, down 0.60), fp32 4 rows 0.857; bf16 and fp32 2 rows, the tiny model's fp32 16 and 32 rows 0.976-1.011.
// With the L3 read over before each matrix instead, avx512_bf16 gained nothing (0.92-1.01 the down projection).
// Cutting where R rows (not M) passed half the L1 cut the gate at 4 rows on AVX2 and lost 5-16 % there. Not
// measured on an Intel CPU or a Zen 3.
constexpr int kPieceRows = 16;

// Values of K in a piece of R input rows of `value_bytes` values: as many as fill half this core's L1, a multiple
// of 64 (of every step and pair block).
inline int64_t input_piece_values(int64_t R, int64_t value_bytes) {
  return std::max<int64_t>(64, l1d_bytes() / 2 / (R * value_bytes) / 64 * 64);
}

// sums[(m + r) * ld + i] = <w_i, x_{m+r}> + bias[i] for the block's kPieceRows weight rows and R input rows from m,
// K in pieces of input_piece_values (one piece where K fits).
template <typename T, int R, int Lanes, typename X>
HCR_INLINE void rows_in_pieces(const T* w, int64_t weight_stride, const X* x, const float* bias, int64_t m,
                               int64_t K, float* sums, int64_t ld) {
  constexpr int NR = weight_rows_per_pass<R, Lanes>(), passes = kPieceRows / NR;
  static_assert(kPieceRows % NR == 0, "rows_in_pieces: whole passes");
  const int64_t piece = input_piece_values(R, sizeof(X)), ahead = kPieceRows * weight_stride;
  alignas(64) float stored[passes][2 * NR * R][Lanes];
  const X* rows = x + m * K;
  for (int64_t k0 = 0; k0 < K; k0 += piece) {
    const int64_t k1 = std::min(K, k0 + piece);
    for (int p = 0; p < passes; ++p) {
      const T* wp = w + p * NR * weight_stride;
      TileChains<NR, R, Lanes> c;
      for (int i = 0; i < NR; ++i)
        for (int r = 0; r < R; ++r) {
          c.even[i][r] = k0 == 0 ? vfloat<Lanes>{} : load_v<Lanes>(stored[p][2 * (i * R + r)]);
          c.odd[i][r] = k0 == 0 ? vfloat<Lanes>{} : load_v<Lanes>(stored[p][2 * (i * R + r) + 1]);
        }
      add_tile_steps<T, NR, R, Lanes>(c, wp, weight_stride, rows, k0, k1, K, ahead);
      if (k1 < K) {
        for (int i = 0; i < NR; ++i)
          for (int r = 0; r < R; ++r) {
            store_v<Lanes>(stored[p][2 * (i * R + r)], c.even[i][r]);
            store_v<Lanes>(stored[p][2 * (i * R + r) + 1], c.odd[i][r]);
          }
        continue;
      }
      float dots[NR * R];
      tile_dots_from<T, NR, R, Lanes>(c, wp, weight_stride, rows, K, dots);
      dots_into_sums<NR, R>(dots, bias != nullptr ? bias + p * NR : nullptr, m, sums + p * NR, ld);
    }
  }
}

// weight_rows_times_inputs for a block of kPieceRows weight rows, K in pieces: each group of input rows (4, 2, 1)
// takes the block's rows piece by piece before the next group reads them again (from the L2).
template <typename T, int Lanes, typename X>
HCR_INLINE void block_in_pieces(const T* w, int64_t weight_stride, const X* x, const float* bias, int64_t M,
                                int64_t K, float* sums, int64_t ld) {
  for_row_groups(M, [&](auto rows, int64_t m) HCR_LAMBDA_INLINE {
    rows_in_pieces<T, decltype(rows)::value, Lanes>(w, weight_stride, x, bias, m, K, sums, ld);
  });
}

// out[m, n] (row stride N, in the weight's dtype) for weight rows n in [n0, n1) and all
// M input rows. 16-bit outputs go through an fp32 tile of kTile features per row, each
// sum rounded once as a tile row is stored a vector at a time.
template <typename T>
struct LinearBlock {
  static constexpr int64_t kTile = 64;

  template <int Lanes, typename X>
  static HCR_INLINE void run(const T* weight, int64_t weight_stride, const X* x, const float* bias, T* out,
                             int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    constexpr bool direct = std::is_same_v<T, float>;  // fp32 sums go straight to out
    constexpr int kWeightRows = kWeightRowsTogether<Lanes>;
    std::vector<float> tile(direct ? 0 : M * kTile);
    const bool in_pieces = M >= 2 && M * K * int64_t(sizeof(X)) > l1d_bytes();  // see rows_in_pieces
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int64_t width = std::min(kTile, n1 - t0);
      float* sums;  // sums[m * ld + j] holds feature t0 + j of row m
      int64_t ld;
      if constexpr (direct) {
        sums = out + t0, ld = N;
      } else {
        sums = tile.data(), ld = kTile;
      }
      int64_t j = 0;
      if (in_pieces)
        for (; j + kPieceRows <= width; j += kPieceRows)
          block_in_pieces<T, Lanes>(weight + (t0 + j) * weight_stride, weight_stride, x,
                                    bias != nullptr ? bias + t0 + j : nullptr, M, K, sums + j, ld);
      for (; j + kWeightRows <= width; j += kWeightRows)
        weight_rows_times_inputs<T, kWeightRows, Lanes>(weight + (t0 + j) * weight_stride, weight_stride, x,
                                                         bias != nullptr ? bias + t0 + j : nullptr, M, K, sums + j, ld);
      for (; j < width; ++j)
        weight_rows_times_inputs<T, 1, Lanes>(weight + (t0 + j) * weight_stride, weight_stride, x,
                                              bias != nullptr ? bias + t0 + j : nullptr, M, K, sums + j, ld);
      if constexpr (!direct) {
        for (int64_t m = 0; m < M; ++m) {
          const float* row = sums + m * ld;
          T* dst = out + m * N + t0;
          int64_t f = 0;
          for (; f + Lanes <= width; f += Lanes) store_from_float<T, Lanes>(dst + f, load_v<Lanes>(row + f));
          for (; f < width; ++f) dst[f] = static_cast<T>(row[f]);
        }
      }
    }
  }
};

// out[i] = float(in[i]) for i < n.
template <typename T>
struct WidenToFloat {
  template <int Lanes>
  static HCR_INLINE void run(const T* in, float* out, int64_t n) { widen_to_float<T, Lanes>(in, out, n); }
};

// out = M rows of K input values as fp32 in widen_paired's order, for add_widened_steps.
template <typename T>
struct WidenInputRows {
  template <int Lanes>
  static HCR_INLINE void run(const T* in, float* out, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; ++m) widen_paired<T, Lanes>(in + m * K, out + m * K, K);
  }
};

// A contiguous fp32 tensor's own memory (no copy needed), else nullptr.
template <typename T>
const float* fp32_as_is(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    if (t.is_contiguous()) return t.const_data_ptr<float>();
  }
  return nullptr;
}

// The input rows as add_widened_steps reads them: fp32 input as it is (widen_paired keeps fp32's order),
// else widened into `storage` by the kernel's own loop (no ATen op: a decode step calls this
// per layer, where an op's dispatch and allocation cost as much as the conversion).
template <typename T>
const float* input_rows_as_float(const at::Tensor& input, int64_t M, int64_t K, std::vector<float>& storage) {
  if (const float* as_is = fp32_as_is<T>(input)) return as_is;
  const at::Tensor dense = input.contiguous();
  storage.resize(M * K);
  run_for_active_isa<WidenInputRows<T>>(dense.const_data_ptr<T>(), storage.data(), M, K);
  return storage.data();
}

// The bias as fp32 in its own order: an fp32 bias as it is, else widened into `storage`.
template <typename T>
const float* bias_as_float(const at::Tensor& bias, std::vector<float>& storage) {
  if (const float* as_is = fp32_as_is<T>(bias)) return as_is;
  const at::Tensor dense = bias.contiguous();
  storage.resize(dense.numel());
  run_for_active_isa<WidenToFloat<T>>(dense.const_data_ptr<T>(), storage.data(), dense.numel());
  return storage.data();
}

// bf16 rows on AMX tiles (Isa::amx, K a multiple of 32). The vector loop widens every weight to fp32 and
// multiplies it into each input row with fp32 FMAs: at 8 rows of the 1.5B MLP that is compute-bound, 0.55-0.70x
// MKL's F.linear (oneDNN's bf16 path). A tile dot product takes 16 weight rows by 32 values straight from the
// weights (the A operand) against up to 16 input rows packed once per call (the B operand, pack_operand_row),
// so 1 and 16 rows read the weights at the same speed (a standalone loop, one thread, 8,960 x 1,536: 1.02 ms
// at 1 row and 1.04 at 8, against 3.8 ms for a standalone loop of vdpbf16ps vectors at 8 rows; with 2 threads
// the avx512_bf16 level's add_pair_blocks took 2.1-2.3 ms at 8 rows, as the widened loop did). Every sum
// is fp32 over exact bf16 products, in the tile's order for every row count (each output column is its own
// sum), so a row's result does not depend on its batch. Two blocks of 16 weight rows take each chunk of the inputs at once; a last
// block of fewer than 16 rows is copied into a zero-padded one.
#if HCR_HAS_ISA_VARIANTS
// out[m, n + j] = sums[j * 16 + m % 16] + bias[n + j], rounded to bf16, for the group's rows m < M and the
// `count` weight rows j of a stored tile: a gather per input row of a whole block.
HCR_TARGET_AMX void store_tile_sums(const float* sums, const float* bias, int64_t n, int64_t count, int64_t g,
                                    int64_t M, int64_t N, c10::BFloat16* out) {
  for (int64_t m = g * kTileRows; m < std::min(M, (g + 1) * kTileRows); ++m) {
    if (count == kTileRows) {
      __m512 row = tile_column(sums, m % kTileRows);
      if (bias != nullptr) row = _mm512_add_ps(row, _mm512_loadu_ps(bias + n));
      store_from_float<c10::BFloat16, 16>(out + m * N + n, row);
    } else {
      for (int64_t j = 0; j < count; ++j)
        out[m * N + n + j] = c10::BFloat16(sums[j * kTileRows + m % kTileRows] + (bias ? bias[n + j] : 0.0f));
    }
  }
}

HCR_TARGET_AMX void bf16_rows_on_tiles(const uint16_t* weight, int64_t weight_stride, const uint16_t* packed,
                                       const float* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K,
                                       int64_t n0, int64_t n1) {
  load_square_tile_config();  // tiles 0 and 3 the sums, 1 and 2 weight rows, 4 one chunk of the inputs
  const int64_t chunks = K / 32, groups = (M + kTileRows - 1) / kTileRows, row_bytes = weight_stride * 2;
  alignas(64) float sums[2][kTileRows * kTileRows];  // sums[block][weight row * 16 + input row]
  std::vector<uint16_t> pad;  // a last block of fewer than 16 rows (one task's at most)
  int64_t n = n0;
  for (; n + 2 * kTileRows <= n1; n += 2 * kTileRows) {
    for (int64_t g = 0; g < groups; ++g) {
      two_blocks_times_packed(weight + n * weight_stride, weight + (n + kTileRows) * weight_stride, row_bytes,
                              packed + g * chunks * kTileElements, chunks);
      _tile_stored(0, sums[0], kTileRows * 4);
      _tile_stored(3, sums[1], kTileRows * 4);
      tile_memory_barrier();
      store_tile_sums(sums[0], bias, n, kTileRows, g, M, N, out);
      store_tile_sums(sums[1], bias, n + kTileRows, kTileRows, g, M, N, out);
    }
  }
  for (; n < n1; n += kTileRows) {
    const int64_t count = std::min(kTileRows, n1 - n);
    const uint16_t* rows = weight + n * weight_stride;
    int64_t stride_bytes = row_bytes;
    if (count < kTileRows) {
      pad.resize(kTileRows * K);
      rows = zero_padded_block(rows, weight_stride, count, K, pad.data()), stride_bytes = K * 2;
      tile_memory_barrier();
    }
    for (int64_t g = 0; g < groups; ++g) {
      block_times_packed(rows, stride_bytes, packed + g * chunks * kTileElements, chunks);
      _tile_stored(0, sums[0], kTileRows * 4);
      tile_memory_barrier();
      store_tile_sums(sums[0], bias, n, count, g, M, N, out);
    }
  }
  _tile_release();
}

// The M input rows packed as the tiles' B operand (pack_operand_row), in a buffer each thread keeps: the
// columns past the last row keep whatever an earlier call left there, as the sums of those columns are never
// stored.
const uint16_t* packed_for_tiles(const at::Tensor& input, int64_t M, int64_t K) {
  static thread_local std::vector<uint16_t> packed;
  const at::Tensor dense = input.contiguous();
  const auto* bits = reinterpret_cast<const uint16_t*>(dense.const_data_ptr<c10::BFloat16>());
  packed.resize(std::max<size_t>(packed.size(), (M + kTileRows - 1) / kTileRows * kTileRows * K));
  for (int64_t m = 0; m < M; ++m) pack_operand_row(bits + m * K, m, K, packed.data());
  return packed.data();
}
#endif

template <typename T>
void linear_all_rows(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     at::Tensor& out, int64_t M, int64_t N, int64_t K) {
  std::vector<float> x_storage, bias_storage;
  const float* b = bias.has_value() ? bias_as_float<T>(*bias, bias_storage) : nullptr;
  const T* w = weight.const_data_ptr<T>();
  const int64_t stride = weight.stride(0);
  T* result = out.mutable_data_ptr<T>();
  // About 32K weights (128 KiB of fp32) per task: small layers run on one thread, big ones on all.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
#if HCR_HAS_ISA_VARIANTS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (K % 32 == 0 && active_isa() == Isa::amx) {  // see bf16_rows_on_tiles
      const uint16_t* packed = packed_for_tiles(input, M, K);
      const int64_t blocks = (N + kTileRows - 1) / kTileRows;
      // whole blocks of 16 weight rows per task, about 32K weights (64 KiB of bf16) or more
      const int64_t tile_grain = std::max<int64_t>(1, 32768 / (kTileRows * K));
      at::parallel_for(0, blocks, tile_grain, [&](int64_t b0, int64_t b1) {
        bf16_rows_on_tiles(reinterpret_cast<const uint16_t*>(w), stride, packed, b, result, M, N, K,
                           b0 * kTileRows, std::min(N, b1 * kTileRows));
      });
      return;
    }
    if (active_isa() >= Isa::avx512_bf16) {  // the input rows as they are stored: add_pair_blocks
      const at::Tensor dense = input.contiguous();
      const auto* x = reinterpret_cast<const uint16_t*>(dense.const_data_ptr<T>());
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        run_avx512<LinearBlock<T>>(w, stride, x, b, result, M, N, K, n0, n1);
      });
      return;
    }
  }
#endif
  const float* x = input_rows_as_float<T>(input, M, K, x_storage);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    run_for_active_isa<LinearBlock<T>>(w, stride, x, b, result, M, N, K, n0, n1);
  });
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "hcr::decode_linear (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(input.dim() >= 1, "hcr::decode_linear: input must be [..., K], got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, "hcr::decode_linear: weight must be [N, K], got ", weight.sizes());
  const int64_t K = input.size(-1), N = weight.size(0);
  int64_t M = 1;  // rows: the product of the leading dims
  for (int64_t d = 0; d + 1 < input.dim(); ++d) M *= input.size(d);
  TORCH_CHECK(weight.size(1) == K, "hcr::decode_linear: weight must be [N, K] = [N, ", K, "] to match input ",
              input.sizes(), ", got ", weight.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hcr::decode_linear: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(input.scalar_type() == dtype, "hcr::decode_linear: input is ", input.scalar_type(), " but weight is ", dtype);
  TORCH_CHECK(K <= 1 || weight.stride(1) == 1, "hcr::decode_linear: weight rows must be contiguous, got strides ",
              weight.strides());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "hcr::decode_linear: bias must be [N] = [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, "hcr::decode_linear: bias is ", bias->scalar_type(), " but weight is ", dtype);
  }
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, input.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // an empty sum: the bias alone, as F.linear gives
    out.zero_();
    return bias.has_value() ? out.add_(*bias) : out;
  }
  switch (dtype) {
    case at::kFloat:
      linear_all_rows<float>(input, weight, bias, out, M, N, K);
      break;
    case at::kBFloat16:
      linear_all_rows<c10::BFloat16>(input, weight, bias, out, M, N, K);
      break;
    default:
      linear_all_rows<c10::Half>(input, weight, bias, out, M, N, K);
  }
  return out;
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) { m.def("decode_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("decode_linear", &hcr::decode_linear_cpu); }
