// CPU kernel of hcr::decode_attention: attention of a few new queries per row over a
// static KV cache whose rows have their own lengths (compressed generation's cache).
//
// Why a kernel of our own: a decode step has one query per head (a re-encode step a
// few), so attention is a matrix-vector product over the cache: its speed is how fast
// the keys and values stream from memory. SDPA's CPU kernels read them at about 40 %
// of a plain read's bandwidth at these shapes, and for more than one query with a
// mask transformers first copies them once per query head (repeat_kv). Here each
// (row, key/value head) task reads its keys once and its values once for all the
// query heads of its group and all the step's queries.
//
// Layout: query [B, Hq, T, D], keys/values [B, Hkv, S, D] (any strides, stride 1
// along D: the cache's [:, :, :span] views), positions [B, T] int64; out [B, T, Hq, D]
// (transformers' attention output layout) in the query's dtype. Query t of row b sits
// at cache slot positions[b, t] (slot i holds position i) and attends slots
// [positions[b, t] - window + 1, positions[b, t]] (from 0 without a window).
// Per task: the queries (scaled) go to fp32 once; then the span of slots they see goes
// in chunks (flash-decoding's online softmax, on one core): pass 1 streams a chunk's
// keys and writes every query's scores; the scores join each query's running softmax;
// pass 2 sums the chunk's values into fp32 accumulators, a block of slots at a time.
// Queries are taken in blocks of at most 16 (query heads x steps), so the scores stay
// R x chunk floats. Pass 1 takes the keys a vector's width of rows at a time, 4 rows
// beside 6 query rows on AVX-512, on AVX2 2 beside 6 for 16-bit keys and 4 beside 2 for
// fp32 (one accumulator per pair, summed across lanes together); pass 2 keeps register
// accumulators per query head of a step (its G heads see the same slots; 6 at a time)
// for two to eight vectors of D, loading each value vector once for all of them. Both
// keep about 8 or more FMA chains in flight: with 4 they ran at half the FMA rate (2
// threads, AMD EPYC with AVX2 only, 512 KiB L2, 3 alternating runs: 1.5B bf16 B 1 10.9 ->
// 8.7 ms, B 8 82 -> 61 ms).
// Six query rows a sweep let each widened key or value vector serve six FMAs: on AVX-512
// (24 chains; Intel Xeon, 2 MiB L2, 2 threads, the benchmark's 1.5B bf16 step, the build
// before -> after: B 1 2.73 -> 2.20 ms, B 8 29.4 -> 25.3 ms; with one layer's caches in
// the L2, 71 -> 55 us a layer) and on AVX2 (12 chains: kSweepQueryRows, kSweepValueRows).
// Keys and values are read straight from the cache and widened in registers, bf16 as
// even and odd elements (vec_math.h's load_pair_half: a shift or a mask, no lane
// shuffle); the queries are stored in the same order, and the accumulators stay in it
// until the output is written (store_paired). Against converting each block of keys to
// fp32 first, query rows by 3, the output one scalar at a time and the values asked for
// in pass 1 (both kernels built into one process, alternating, 2 threads, AVX2 EPYC,
// 512 KiB L2, time new / old): one task of the 1.5B shape, its 1 MiB in the L3,
// 0.73-0.80; the tiny model at 256 slots (in the L3) 0.76-0.99; the shapes whose caches
// come from memory unchanged (1.5B B1 0.90-1.09, B8 0.93-1.07, 1,700 slots 0.86-1.06):
// there the kernel reads at about half a plain read's speed either way.
// fp32 math for fp32, bf16 and fp16. Compiled for AVX-512, AVX2 and the baseline,
// each with vectors of its register width (cpu_isa.h). On the amx level (AVX-512 plus
// Intel's AMX tiles) pass 1 over bf16 caches runs on tiles instead (tile_scores):
// 1.5B bf16 B 1 0.80-0.83x, B 8 0.78-0.90x the time of the AVX-512 sweeps (Intel Xeon,
// 2 threads, 3 alternations); pass 2 on tiles measured slower from memory (HISTORY.md).
// On the avx512_bf16 level (AMD Zen 4) pass 1 over bf16 caches multiplies bf16 pairs
// (block_dots with bf16 query rows, scores_in_pairs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "bf16_pairs.h"
#include "decode_ops.h"
#include "vec_math.h"

namespace hcr {
namespace {

constexpr int64_t kBlockQueries = 16;  // query rows (heads x steps) sharing one pass over the cache
constexpr int64_t kSlotBlock = 64;     // value rows summed per vector of D while they sit in L1 (<= 32 KiB)
constexpr int64_t kKeyPrefetchBytes = 16 << 10;  // how far ahead of pass 1 its key rows are asked for
// How far ahead of pass 2's summing loop its 16-bit value rows are asked for, into the L1. Each block of
// value rows is swept once per 32 bytes of D and group of query rows, so a row's 64-byte lines are first
// touched by strided sweeps the hardware prefetcher did not run ahead of. Measured side by side (the same
// build with and without, alternating in one process, 12 rounds; AVX2 EPYC, 2 threads; time with / without):
// 1.5B bf16 B 1 0.94, 1.01, 0.97, 1.00; B 8 0.95, 0.90, 0.99, 0.93; fp16 B 1 0.90, 0.93, 0.99; one task in
// the L3 0.99, 0.98. The fp32 caches of the tiny model lost with it (1.01-1.13), so they do not ask.
// The same sweep also asks for its line kKeyPrefetchBytes ahead into the L2 (as pass 1 does for keys): pass 2
// read its values at about half a plain read's speed. Measured side by side the same way on an Intel Xeon
// with AVX-512 (2 MiB L2, 2 threads; time with / without, 12 rounds): 1.5B bf16 B 8 0.88, 0.87, AVX2 path
// 0.90; B 1 0.98, 1.01, AVX2 path 0.98 (not measured on the AMD EPYCs; asking for a whole block of values
// ahead at once, measured on the AVX2 EPYC, had gained nothing there).
// Where the rows lie one after another (a cache's layout), the L2 asks go in address order: each asking sweep
// takes the next stretch of the byte range `far` rows ahead (weighted_sum_vectors), where they had asked for
// line k of every row of the block, then line k + 1 on the next asking sweep: pass 1's key asks, a row's lines
// in turn, already went in order. Measured side by side on the AVX2 EPYC (Zen 3, 512 KiB L2, 2 threads, both
// ways in one build, alternating in one process, 20-30 rounds, the L3 read over before each step; time in order
// / as before, median of the rounds' ratios): 1.5B bf16 B 8 0.907, 0.829, 0.908, B 1 0.898, 0.897, 0.905; fp16
// B 8 0.899; bf16 B 8 at 1,000 slots 0.913; the re-encode step (T = 6, B 4) 1.005; one task in the L2 or L3
// (512 / 2,048 slots, bf16 and fp16) 0.998-1.006. On an AVX-512 EPYC (Zen 4, 1 MiB L2; the same way, 20 rounds):
// bf16 B 1 1.024, 0.991, B 8 1.026, 0.994, fp16 B 8 0.989, AVX2 path 1.005 / 1.008: no difference there. Not measured
// on an Intel CPU.
// Since the asking slots run a loop of their own (a slot at a time, the tests of whether to ask had cost more than
// the asks where the caches sit in the L3), fp32 value rows ask into the L2 too, where a sweep covers part of a row
// (AVX2 and the baseline at D = 64; AVX-512's sweeps over the tiny model's rows cover whole rows, in address order),
// and of the sweeps over a block of a step's queries only the first asks (the later sweeps find the block in the
// L1 or L2).
// Measured on the AVX2 EPYC (the function before beside the new one in one build, alternating in one process, time
// new / before, 16-80 rounds, median of the ratios): the tiny model's fp32 caches (B 8, 4 layers) at 1,700 slots 0.90,
// 0.91, 512 slots 0.92, 256 slots 1.01-1.04, 128 slots 1.03, T = 6 0.87, 0.94; baseline 1,700 slots 0.78, 0.81,
// 256 slots 1.04-1.06; bf16 at 1,700 slots 0.91, 0.92, 256 slots 0.91, T = 6 0.96-0.99; the 1.5B bf16 steps from
// memory B 1 0.99-1.00, B 8 1.01, T = 6 0.99-1.00; one task in the L2 or L3 0.98-1.00 (benchmarks/HISTORY.md).
// Build against build (benchmarks/compare_builds.py, 12 pairs of processes, one thread): fp32 1,700 slots 0.84,
// 256 slots 0.87; bf16 1,700 slots 0.99, so the in-build bf16 gain did not hold.
constexpr int64_t kValuePrefetchRows = 8;

// out[r * out_stride] = <q + r * n, k> for R query rows sharing one key row: R independent
// FMA chains (one per row, each a register), so the rows hide each other's FMA latency.
template <int R, int Lanes>
HCR_INLINE void dots(const float* q, const float* k, int64_t n, float* out, int64_t out_stride) {
  vfloat<Lanes> sum[R] = {};
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
    const vfloat<Lanes> kv = load_v<Lanes>(k + i);
    for (int r = 0; r < R; ++r) sum[r] += load_v<Lanes>(q + r * n + i) * kv;
  }
  for (int r = 0; r < R; ++r) {
    float total = halving_sum<Lanes>(sum[r]);
    for (int64_t j = i; j < n; ++j) total += q[r * n + j] * k[j];
    out[r * out_stride] = total;
  }
}

// Asks for rows [from, to) of a cache (each `bytes` long, `stride` elements apart) ahead of their use, so
// their reads from memory overlap arithmetic. Locality 3 fetches into L1, 1 into the outer caches (L2).
template <int Locality, typename T>
HCR_INLINE void prefetch_rows(const T* base, int64_t stride, int64_t from, int64_t to, int64_t bytes) {
  for (int64_t row = from; row < to; ++row) {
    const char* p = reinterpret_cast<const char*>(base + row * stride);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, Locality);
  }
}

// The G query heads of one step against one key row, in groups of 4, 2 and 1.
template <int Lanes>
HCR_INLINE void group_dots(const float* q, const float* k, int64_t G, int64_t n, float* out, int64_t out_stride) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) dots<4, Lanes>(q + g * n, k, n, out + g * out_stride, out_stride);
  for (; g + 2 <= G; g += 2) dots<2, Lanes>(q + g * n, k, n, out + g * out_stride, out_stride);
  if (g < G) dots<1, Lanes>(q + g * n, k, n, out + g * out_stride, out_stride);
}

#if HCR_HAS_ISA_VARIANTS
// block_dots' step on AVX2 for 16-bit keys, six query rows beside two key rows, written out in asm: s[row][r] +=
// the products of 16 values of query row `row` (fp32, n apart, in load_pair_half's order) and key row r (k_stride
// apart), each key half widened once into ymm13 / ymm14 and each query vector loaded once into ymm15 for its two
// FMAs. 12 accumulators, 2 keys, the query and the bf16 mask take all 16 registers: compiled from C++, GCC either
// folded each query load into both of its FMAs (28 loads a step where 16 do; the loop ran at about half the FMA
// rate on an AVX2 EPYC, Zen 3) or, with the query forced into a register, spilled 3 accumulators. The same FMAs in
// the same order as multiply_add_keys, so every score is bit for bit the same. One task of the 1.5B shape (bf16,
// 512 / 2,048 slots, one thread) took 0.86-0.94x the time of the C++ step, fp16 0.93-0.94x; the 1.5B step from
// memory (2 threads) B 1 0.93-0.97x, B 8 0.94-0.97x (AVX2 EPYC, Zen 3, alternating in one process). The rows
// are read through registers (asm takes at most 30 operands, 24 of them the accumulators), hence "memory".
#define HCR_QUERY_ROW(R, ADDRESS) \
  "vmovups " ADDRESS ", %%ymm15\n\tvfmadd231ps %%ymm13, %%ymm15, %[s" #R "0]\n\tvfmadd231ps %%ymm14, %%ymm15, %[s" #R "1]\n\t"
#define HCR_SIX_ROWS(OFFSET)                                                                              \
  HCR_QUERY_ROW(0, OFFSET "(%[q])") HCR_QUERY_ROW(1, OFFSET "(%[q],%[n4])") HCR_QUERY_ROW(2, OFFSET "(%[q],%[n4],2)") \
  HCR_QUERY_ROW(3, OFFSET "(%[q3])") HCR_QUERY_ROW(4, OFFSET "(%[q3],%[n4])") HCR_QUERY_ROW(5, OFFSET "(%[q3],%[n4],2)")
#define HCR_SIX_ROWS_OPERANDS                                                                                        \
  [s00] "+x"(s[0][0]), [s01] "+x"(s[0][1]), [s10] "+x"(s[1][0]), [s11] "+x"(s[1][1]), [s20] "+x"(s[2][0]),           \
      [s21] "+x"(s[2][1]), [s30] "+x"(s[3][0]), [s31] "+x"(s[3][1]), [s40] "+x"(s[4][0]), [s41] "+x"(s[4][1]),       \
      [s50] "+x"(s[5][0]), [s51] "+x"(s[5][1])
template <typename T>
HCR_INLINE void six_rows_two_keys_avx2(const float* q, int64_t n, const T* k, int64_t k_stride, vfloat<8> (&s)[6][2]) {
  const float* q3 = q + 3 * n;
  const int64_t n4 = n * int64_t(sizeof(float)), ks = k_stride * int64_t(sizeof(T));
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // even elements: the bits shifted up; odd: the low half masked
    const vu32<8> mask = vu32<8>{} + 0xffff0000u;
    asm("vmovdqu (%[k]), %%ymm13\n\tvpslld $16, %%ymm13, %%ymm13\n\t"
        "vmovdqu (%[k],%[ks]), %%ymm14\n\tvpslld $16, %%ymm14, %%ymm14\n\t" HCR_SIX_ROWS("")
        "vpand (%[k]), %[mask], %%ymm13\n\tvpand (%[k],%[ks]), %[mask], %%ymm14\n\t" HCR_SIX_ROWS("32")
        : HCR_SIX_ROWS_OPERANDS
        : [k] "r"(k), [ks] "r"(ks), [q] "r"(q), [q3] "r"(q3), [n4] "r"(n4), [mask] "x"(mask)
        : "xmm13", "xmm14", "xmm15", "memory");
  } else {  // fp16: the first 8 values, then the next 8 (F16C)
    static_assert(std::is_same_v<T, c10::Half>, "16-bit keys: bf16 or fp16");
    asm("vcvtph2ps (%[k]), %%ymm13\n\tvcvtph2ps (%[k],%[ks]), %%ymm14\n\t" HCR_SIX_ROWS("")
        "vcvtph2ps 16(%[k]), %%ymm13\n\tvcvtph2ps 16(%[k],%[ks]), %%ymm14\n\t" HCR_SIX_ROWS("32")
        : HCR_SIX_ROWS_OPERANDS
        : [k] "r"(k), [ks] "r"(ks), [q] "r"(q), [q3] "r"(q3), [n4] "r"(n4)
        : "xmm13", "xmm14", "xmm15", "memory");
  }
}
#undef HCR_QUERY_ROW
#undef HCR_SIX_ROWS
#undef HCR_SIX_ROWS_OPERANDS
#endif

// s[row][r] += q_row * key[r] for QR query rows (one vector each, n apart) and KR key vectors: block_dots' step.
template <int QR, int KR, int Lanes>
HCR_INLINE void multiply_add_keys(const float* q, int64_t n, const vfloat<Lanes>* key, vfloat<Lanes> (&s)[QR][KR]) {
  for (int row = 0; row < QR; ++row) {
    const vfloat<Lanes> qv = load_v<Lanes>(q + row * n);
    for (int r = 0; r < KR; ++r) s[row][r] += qv * key[r];
  }
}

#if HCR_HAS_ISA_VARIANTS
// s[row][r] += the pair products of 32 bf16 values of QR query rows (n apart) and KR key rows (k_stride apart), as
// stored: block_dots' step in pairs.
template <int QR, int KR>
HCR_INLINE void add_pair_products_of_keys(const uint16_t* q, int64_t n, const uint16_t* k, int64_t k_stride,
                                          vfloat<16> (&s)[QR][KR]) {
  bf16_pairs key[KR];
  for (int r = 0; r < KR; ++r) key[r] = load_bf16_pairs(k + r * k_stride);
  for (int row = 0; row < QR; ++row) {
    const bf16_pairs qv = load_bf16_pairs(q + row * n);
    for (int r = 0; r < KR; ++r) add_pair_products(s[row][r], key[r], qv);
  }
}
#endif

// out[r * out_stride + j] = <q + r * n, k + j * k_stride> for QR query rows (fp32, in widen_paired's order)
// and the Lanes key rows of a block (the cache's own rows, widened in registers): one register accumulator
// per (query row, key row), summed across lanes all at once per query row (transposed_sums) and stored as
// one vector: for T = 1 and G = 2 this pass took 1.5x less time in L2 than one halving_sum per (head,
// slot). Key rows go KR at a time with the QR query rows beside them: KR * QR FMA chains in flight (one query
// row's 4 chains waited on the FMA latency: half the FMA rate), each key vector loaded once for the QR rows.
// The Lanes key rows from `ahead` on (ahead_rows of them, none if <= 0), further down the chunk, are asked for
// into the outer caches as the block's own rows are read: a line of KR rows ahead as the sweep reaches the same
// line of its KR rows (score_chunk says why); where D is not whole pairs of vectors or whole lines, or fewer
// than KR rows are left ahead, the KR rows' lines all at once before their sums.
// Query rows as Q = uint16_t: bf16 as stored and unscaled, against bf16 keys as stored in pairs (vdpbf16ps,
// bf16_pairs.h; the avx512_bf16 level, D a multiple of 32): the products of a 32-value step, nothing widened,
// the sums times `scale` at the end (as the AMX tiles'). Q = float: fp32 rows scaled already, and scale 1.
template <typename T, int QR, int KR, int Lanes, typename Q>
HCR_INLINE void block_dots(const Q* q, const T* k, int64_t k_stride, int64_t n, float scale, float* out,
                           int64_t out_stride, const T* ahead, int64_t ahead_rows) {
  static_assert(Lanes % KR == 0 && (KR == 4 || Lanes < 16), "a block's key rows go KR at a time (4 where folded)");
  constexpr bool Pairs = std::is_same_v<Q, uint16_t>;
  static_assert(!Pairs || (Lanes == 16 && std::is_same_v<T, c10::BFloat16>), "pairs: bf16 keys, 32 values a step");
  // Per query row, its dots with the block's key rows as vectors still to be summed across lanes. AVX-512
  // folds each 4 key rows' accumulators two levels of transposed_sums at once, so a quarter as many vectors go
  // through memory (one layer's 1.5B caches in the L2: 58 -> 55 us a layer, Intel Xeon); the AVX2 path
  // measured 1.00-1.06x the time with it (same machine, 5 alternations), so AVX2 keeps one vector per key row.
  constexpr int KeysPerKept = Lanes >= 16 ? 4 : 1;
  vfloat<Lanes> kept[QR][Lanes / KeysPerKept];
  const int64_t pairs = n - n % (2 * Lanes), vectors = n - n % Lanes;
  const bool whole_lines = pairs == n && (n * int64_t(sizeof(T))) % 64 == 0;
  for (int j = 0; j < Lanes; j += KR) {
    const bool line_by_line = whole_lines && j + KR <= ahead_rows;
    if (!line_by_line) prefetch_rows<1>(ahead, k_stride, j, std::min<int64_t>(j + KR, ahead_rows), n * int64_t(sizeof(T)));
    vfloat<Lanes> s[QR][KR] = {};
    for (int64_t i = 0; i < pairs; i += 2 * Lanes) {
      if (line_by_line) prefetch_step_lines<T, Lanes, KR, 1>(ahead + j * k_stride, k_stride, i);
      if constexpr (Pairs) {
#if HCR_HAS_ISA_VARIANTS
        add_pair_products_of_keys<QR, KR>(q + i, n, reinterpret_cast<const uint16_t*>(k + j * k_stride + i), k_stride, s);
#endif
      } else if constexpr (HCR_HAS_ISA_VARIANTS && Lanes == 8 && QR == 6 && KR == 2 && sizeof(T) == 2) {
#if HCR_HAS_ISA_VARIANTS
        six_rows_two_keys_avx2<T>(q + i, n, k + j * k_stride + i, k_stride, s);
#endif
      } else {
        for (int half = 0; half < 2; ++half) {
          vfloat<Lanes> kv[KR];
          for (int r = 0; r < KR; ++r) kv[r] = load_pair_half<T, Lanes>(k + (j + r) * k_stride + i, half);
          multiply_add_keys<QR, KR, Lanes>(q + i + half * Lanes, n, kv, s);
        }
      }
    }
    if constexpr (!Pairs) {  // pairs: n is whole steps
      for (int64_t i = pairs; i < vectors; i += Lanes) {
        vfloat<Lanes> kv[KR];
        for (int r = 0; r < KR; ++r) kv[r] = load_as_float<T, Lanes>(k + (j + r) * k_stride + i);
        multiply_add_keys<QR, KR, Lanes>(q + i, n, kv, s);
      }
    }
    for (int row = 0; row < QR; ++row) {
      if constexpr (KeysPerKept == 4) {
        kept[row][j / 4] = pair_fold<Lanes, Lanes / 2>(pair_fold<Lanes, Lanes>(s[row][0], s[row][1]),
                                                       pair_fold<Lanes, Lanes>(s[row][2], s[row][3]));
      } else {
        for (int r = 0; r < KR; ++r) kept[row][j + r] = s[row][r];
      }
    }
  }
  for (int row = 0; row < QR; ++row) {
    vfloat<Lanes> total = transposed_sums<Lanes, Lanes / KeysPerKept>(kept[row]);
    if constexpr (!Pairs) {
      for (int64_t i = vectors; i < n; ++i) {
        for (int j = 0; j < Lanes; ++j) total[j] += q[row * n + i] * static_cast<float>(k[j * k_stride + i]);
      }
    }
    store_v<Lanes>(out + row * out_stride, total * scale);
  }
}

// f(std::integral_constant<int, n>) for 0 < n < Max: a count known at run time as a template argument (the
// remainder of a sweep over rows). f must be HCR_LAMBDA_INLINE, so its body is compiled in the caller's ISA.
template <int Max, typename F>
HCR_INLINE void with_count_below(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n == Max - 1) {
      f(std::integral_constant<int, Max - 1>{});
    } else {
      with_count_below<Max - 1>(n, f);
    }
  }
}

// Query rows per sweep over a block of keys, and key rows beside them: six query rows, so a decode step's six
// query heads of a group (R1-Distill-Qwen-1.5B's) take one sweep and each key vector, widened once, serves six
// FMAs. AVX-512's 32 registers hold 6 x 4 accumulators beside 4 key vectors. AVX2's 16 hold 6 x 2 beside 2 (and
// the bf16 mask) for 16-bit keys: against pairs of query rows beside 4 key rows (an AVX2 EPYC's choice when threes
// beside 4 spilled accumulators), which widen each key vector three times, 6 x 2 and pass 2's sixes
// (kSweepValueRows) together took 0.87-0.91x the time of one task's 1.5B bf16 caches in the L2 (one thread;
// fp16 0.94-0.96x) and 0.89-0.95x at 1.5B bf16 B 1, 0.92-0.97x at B 8 (Intel Xeon on its AVX2 path, 2 threads,
// both kernels built into one process and alternating, 3 runs of 30 rounds); not measured on an AVX2 EPYC. fp32
// keys need no widening and keep pairs (6 x 2 took 1.04-1.08x the time on the tiny model's re-encode shape). AVX2's
// 6 x 2 step over 16-bit keys is written in asm (six_rows_two_keys_avx2), as GCC could not fit it in the registers.
template <typename T, int Lanes>
constexpr int kSweepQueryRows = Lanes >= 16 || sizeof(T) == 2 ? 6 : 2;
template <int QR, int Lanes>
constexpr int kSweepKeyRows = Lanes < 16 && QR > 2 ? 2 : 4;

// block_dots for R query rows, kSweepQueryRows at a time, and the rest: in one sweep on AVX-512 (in bf16 pairs too:
// three query rows a sweep took 1.02-1.03x the time of the widened pass at the 1.5B step, six 0.85-0.95x), in pairs
// (and a single row) beside 4 key rows on AVX2, where four rows beside 2 key rows (G = 4) took 1.07x the time.
// The first sweep asks for the rows from `ahead` (block_dots).
template <typename T, int Lanes, typename Q>
HCR_INLINE void rows_block_dots(const Q* q, const T* k, int64_t k_stride, int64_t R, int64_t n, float scale, float* out,
                                int64_t out_stride, const T* ahead, int64_t ahead_rows) {
  constexpr int QR = kSweepQueryRows<T, Lanes>;
  int64_t r = 0;
  for (; r + QR <= R; r += QR, ahead_rows = 0) {
    block_dots<T, QR, kSweepKeyRows<QR, Lanes>, Lanes>(q + r * n, k, k_stride, n, scale, out + r * out_stride, out_stride,
                                                       ahead, ahead_rows);
  }
  if constexpr (Lanes >= 16) {
    with_count_below<QR>(R - r, [&](auto rows) HCR_LAMBDA_INLINE {
      block_dots<T, decltype(rows)::value, 4, Lanes>(q + r * n, k, k_stride, n, scale, out + r * out_stride, out_stride,
                                                     ahead, ahead_rows);
    });
  } else {
    for (; r + 2 <= R; r += 2, ahead_rows = 0) {
      block_dots<T, 2, 4, Lanes>(q + r * n, k, k_stride, n, scale, out + r * out_stride, out_stride, ahead, ahead_rows);
    }
    if (r < R) block_dots<T, 1, 4, Lanes>(q + r * n, k, k_stride, n, scale, out + r * out_stride, out_stride, ahead, ahead_rows);
  }
}

// Vector e of the values at p: in widen_paired's order where Paired (p starts a whole pair), else as stored.
template <typename T, int Lanes, bool Paired>
HCR_INLINE vfloat<Lanes> load_value_vector(const T* p, int e) {
  if constexpr (Paired) {
    return load_pair_half<T, Lanes>(p + e / 2 * 2 * Lanes, e % 2);
  } else {
    return load_as_float<T, Lanes>(p + e * Lanes);
  }
}

// acc[j * n + d] += sum over slots s in [s0, s1) of p[j * p_stride + s] * v[s * v_stride + d] for the DV
// vectors of d from d0 (in widen_paired's order where Paired), for R query rows j sharing the value rows:
// R * DV register accumulators over the slots (each value vector loaded once for the R rows, each weight
// broadcast once for the DV vectors), so nothing but the value rows goes through memory. With one or two
// rows, even and odd slots go to separate accumulators (Split). The caller picks DV so that enough FMA
// chains are in flight (value_vectors_per_sweep): each chain waits on its own previous FMA, and fewer chains
// left the FMA units idle (one vector of d for 4 rows: half their rate). Each sum's order is the same
// whatever DV. Step > 0: p holds the weights slot by slot from s0 instead, Step of them a slot (weighted_sums).
template <typename T, int R, int DV, bool Paired, int Lanes, int Step = 0>
HCR_INLINE void weighted_sum_vectors(const T* v, int64_t v_stride, const float* p, int64_t p_stride, int64_t s0,
                                     int64_t s1, float* acc, int64_t n, int64_t d0, int64_t ask_end) {
  const auto weight_of = [&](int j, int64_t row) HCR_LAMBDA_INLINE {
    return Step > 0 ? p[(row - s0) * Step + j] : p[j * p_stride + row];
  };
  constexpr int Split = R <= 2 ? 2 : 1;
  vfloat<Lanes> sum[Split][R][DV] = {};
  // Asks (why, and what each measured: kValuePrefetchRows). The sweep that starts a 64-byte line of the rows asks
  // for that line (and the rest of the lines it covers) for rows `far` rows ahead into the L2, and for 16-bit rows
  // also kValuePrefetchRows rows ahead into the L1 (rows below ask_end only). fp32 rows ask only where a sweep
  // covers part of a row: a sweep over whole rows reads the block in address order already. Rows stored one after
  // another (v_stride == n: a cache's layout) make the block's rows `far` ahead one byte range, which the block's
  // asking sweeps take in address order: the sweep at byte o of the rows asks, a line a slot, for the lines from
  // line o / 64 * (s1 - s0) of that range on. Other strides ask for line o / 64 of each row `far` ahead.
  // The asking slots are a prefix of the sweep, run by a loop of their own: tested a slot at a time, the asks had
  // cost the tiny model's fp32 caches at 256 slots 1.09-1.13x the time even with no line asked for.
  // On an AVX-512 EPYC (Zen 4) the 1.5B bf16 step from memory took 1.08x the time at f209512 than at 32b551c, build
  // against build, spread over several changes of pass 2 (this loop among them, 1.01 alone), where its AVX2 path
  // gained 0.91x (benchmarks/HISTORY.md, Zen 4, 2026-12-07): not yet looked into.
  constexpr bool kAskL1 = sizeof(T) == 2;
  const bool ask = (d0 * int64_t(sizeof(T))) % 64 == 0 && (sizeof(T) == 2 || DV * Lanes < n);
  constexpr int lines = std::max<int>(1, DV * Lanes * int(sizeof(T)) / 64);
  const int64_t far = kKeyPrefetchBytes / (n * int64_t(sizeof(T)));  // rows as far ahead as pass 1's keys
  const bool in_order = ask && v_stride == n;
  uintptr_t far_at = 0;           // in order: the next address asked for
  int64_t l1_end = s0, l2_end = s0;  // the slots [s0, l1_end) ask into the L1, [s0, l2_end) into the L2
  if (ask) {
    if (kAskL1) l1_end = std::clamp(ask_end - kValuePrefetchRows, s0, s1);
    if (in_order) {  // whole slots' lines below the range's end (it may end past the cache)
      const uintptr_t rows = reinterpret_cast<uintptr_t>(v), row_bytes = uintptr_t(n) * sizeof(T);
      far_at = rows + uintptr_t(s0 + far) * row_bytes + uintptr_t(d0 * int64_t(sizeof(T)) / 64 * (s1 - s0)) * 64;
      const uintptr_t far_end = rows + uintptr_t(std::max(s0 + far, std::min(ask_end, s1 + far))) * row_bytes;
      if (far_end > far_at) l2_end = std::min<int64_t>(s1, s0 + int64_t((far_end - far_at) / (64 * lines)));
    } else {
      l2_end = std::clamp(ask_end - far, s0, s1);
    }
  }
  int64_t slot = s0;
  auto sweep = [&](int64_t end, auto ask_l1, auto ask_l2) HCR_LAMBDA_INLINE {
    for (; slot + Split <= end; slot += Split) {
      for (int h = 0; h < Split; ++h) {
        const int64_t row = slot + h;
        if constexpr (decltype(ask_l1)::value) prefetch_lines<lines, 3>(v + (row + kValuePrefetchRows) * v_stride + d0);
        if constexpr (decltype(ask_l2)::value) {
          if (in_order) {
            for (int line = 0; line < lines; ++line, far_at += 64) {
              __builtin_prefetch(reinterpret_cast<const void*>(far_at), 0, 1);
            }
          } else {
            prefetch_lines<lines, 1>(v + (row + far) * v_stride + d0);
          }
        }
        vfloat<Lanes> value[DV];
        for (int e = 0; e < DV; ++e) value[e] = load_value_vector<T, Lanes, Paired>(v + row * v_stride + d0, e);
        for (int j = 0; j < R; ++j) {
          const float weight = weight_of(j, row);
          for (int e = 0; e < DV; ++e) sum[h][j][e] += weight * value[e];
        }
      }
    }
  };
  // Phases on the Split grid from s0 (each slot keeps its accumulator): both asks, the longer one alone, none.
  const auto on_grid = [&](int64_t end) { return s0 + (end - s0) / Split * Split; };
  const int64_t both = on_grid(std::min(l1_end, l2_end)), either = on_grid(std::max(l1_end, l2_end));
  sweep(both, std::bool_constant<kAskL1>{}, std::true_type{});
  if (l1_end > l2_end) {
    sweep(either, std::bool_constant<kAskL1>{}, std::false_type{});
  } else {
    sweep(either, std::false_type{}, std::true_type{});
  }
  sweep(s1, std::false_type{}, std::false_type{});
  for (; slot < s1; ++slot) {
    for (int e = 0; e < DV; ++e) {
      const vfloat<Lanes> value = load_value_vector<T, Lanes, Paired>(v + slot * v_stride + d0, e);
      for (int j = 0; j < R; ++j) sum[0][j][e] += weight_of(j, slot) * value;
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int e = 0; e < DV; ++e) {
      vfloat<Lanes> total = sum[0][j][e];
      for (int h = 1; h < Split; ++h) total += sum[h][j][e];
      float* a = acc + j * n + d0 + e * Lanes;
      store_v<Lanes>(a, load_v<Lanes>(a) + total);
    }
  }
}

// Value vectors of D per register accumulator sweep over the slots for R query rows (Split accumulators each):
// about 8 FMA chains in flight on AVX2's 16 registers; on AVX-512's 32, the largest power of two (at least a
// pair) whose R * Split * DV accumulators stay within 24 and, with the DV value vectors, within 28 registers.
template <int R, int Split, int Lanes>
constexpr int value_vectors_per_sweep() {
  if constexpr (Lanes < 16) {
    return std::max(2, 8 / (R * Split));
  } else {
    int dv = 2;
    while (R * Split * dv * 2 <= 24 && (R * Split + 1) * dv * 2 <= 28) dv *= 2;
    return dv;
  }
}

// acc[j * n + d] += sum over slots s in [s0, s1) of p[j * p_stride + s] * v[s * v_stride + d] for every d < n
// and R query rows j, acc in widen_paired's order: DV vectors of d at a time (weighted_sum_vectors) over the
// whole pairs, then pairs, then single vectors, then scalars.
template <typename T, int R, int Lanes>
HCR_INLINE void weighted_sums(const T* v, int64_t v_stride, const float* p, int64_t p_stride, int64_t s0, int64_t s1,
                              float* acc, int64_t n, int64_t ask_end) {
  constexpr int DV = value_vectors_per_sweep<R, R <= 2 ? 2 : 1, Lanes>();
  static_assert(DV % 2 == 0, "DV vectors must be whole pairs");
  const int64_t pairs = n - n % (2 * Lanes);
  int64_t d = 0;
  // 16-bit value rows, three or more query rows: the block's weights copied slot by slot first (each slot's R weights
  // side by side), so the sweeps read them at fixed offsets from one pointer, where GCC had kept each query row's
  // pointer on the stack and loaded it again for every weight. Every sum the same. AVX2 EPYC (Zen 3), a switch between
  // both ways inside one build, 30-40 rounds, time copied / as before: 1.5B bf16 from memory B 1 0.951, 0.955, 0.955,
  // B 8 0.955; the tiny model's bf16 caches at T = 6 0.942, 0.963; one task in the L2 or L3 1.00-1.01; against the
  // build before it and the joint sweeps above (two builds alternating, 8 times): 1.5B B 1 0.88 (one thread), 0.86 (2
  // threads), B 8 0.93 (2 threads); the final code (one loop of sweeps, run) against that build, one thread, 12 times:
  // B 1 0.93. fp32 rows keep the scores' rows: the tiny fp32 T = 6 step took 0.99-1.025x with it.
  if constexpr (R >= 3 && sizeof(T) == 2) {
    if (DV * Lanes <= pairs && s1 - s0 <= kSlotBlock) {
      alignas(32) float slot_major[kSlotBlock * R];
      for (int64_t slot = s0; slot < s1; ++slot) {
        for (int j = 0; j < R; ++j) slot_major[(slot - s0) * R + j] = p[j * p_stride + slot];
      }
      for (; d + DV * Lanes <= pairs; d += DV * Lanes) {
        weighted_sum_vectors<T, R, DV, true, Lanes, R>(v, v_stride, slot_major, 0, s0, s1, acc, n, d, ask_end);
      }
    }
  }
  for (; d + DV * Lanes <= pairs; d += DV * Lanes) {
    weighted_sum_vectors<T, R, DV, true, Lanes>(v, v_stride, p, p_stride, s0, s1, acc, n, d, ask_end);
  }
  for (; d < pairs; d += 2 * Lanes) {
    weighted_sum_vectors<T, R, 2, true, Lanes>(v, v_stride, p, p_stride, s0, s1, acc, n, d, ask_end);
  }
  for (; d + Lanes <= n; d += Lanes) {
    weighted_sum_vectors<T, R, 1, false, Lanes>(v, v_stride, p, p_stride, s0, s1, acc, n, d, ask_end);
  }
  for (; d < n; ++d) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      const float value = static_cast<float>(v[slot * v_stride + d]);
      for (int j = 0; j < R; ++j) acc[j * n + d] += p[j * p_stride + slot] * value;
    }
  }
}

// Query heads of a step summed over the same value rows at once: six, so each value vector, widened once, serves a
// decode step's six heads of a group (R1-Distill-Qwen-1.5B's). On AVX2 the 6 x 2 accumulators, 2 value vectors and
// a weight take 15 of its 16 registers; fours, then a pair, widened each value vector twice (figures with
// kSweepQueryRows'; fp32 caches, G = 6: 0.95-0.97x the time in the L2).
// A re-encode step's T queries see the same slots but for the last few of their span; where a step's G heads do not
// fill whole sweeps (the tiny model's G = 2: sweeps of two rows, even and odd slots apart), the slots every step sees
// go through sweeps of six of the T x G rows, so each value vector is loaded a third as often and twelve FMA chains run
// where eight did; each step's own slots after (run). Against the build before it (two builds, one process each,
// alternating 8 times, the same step 30-40 times a process, median of the pairs' ratios; AVX2 EPYC, Zen 3): the tiny
// model's fp32 caches, B 8, T = 6, 1,700 slots 0.84 (one thread), 0.86 (2 threads); bf16 (with weighted_sums' copied
// weights) 0.91, 0.91. Those figures are of a version that kept a block's sweeps in an array on the stack, which cost
// the T = 1 steps 1.03-1.10x; the final loop (run) against the same build, one thread pinned, 12 times: T = 6 0.92,
// T = 1 0.98-1.02. Written first with the step's sums at three call sites, it had tripled the kernel's code (each
// site inlines every sweep) and gained about 0.98 at fp32 (one thread); a switch between both ways inside that one
// build had shown 0.75-0.92. G = 6 (the 1.5B model's) fills whole sweeps and takes each step on its own, as before.
constexpr int kSweepValueRows = 6;

// The G query heads of one step against the value rows [s0, s1), kSweepValueRows at a time and the rest in one sweep.
template <typename T, int Lanes>
HCR_INLINE void group_weighted_sums(const T* v, int64_t v_stride, const float* p, int64_t p_stride, int64_t G,
                                    int64_t s0, int64_t s1, float* acc, int64_t n, int64_t ask_end) {
  constexpr int R = kSweepValueRows;
  int64_t g = 0;
  for (; g + R <= G; g += R) {
    weighted_sums<T, R, Lanes>(v, v_stride, p + g * p_stride, p_stride, s0, s1, acc + g * n, n, ask_end);
    ask_end = 0;  // the first sweep over the rows asks for them
  }
  with_count_below<R>(G - g, [&](auto rows) HCR_LAMBDA_INLINE {
    weighted_sums<T, decltype(rows)::value, Lanes>(v, v_stride, p + g * p_stride, p_stride, s0, s1, acc + g * n, n, ask_end);
  });
}

// A row of n values as fp32 in widen_paired's order: the row itself for fp32 (whose order is the stored
// one), else widened into `buffer`.
template <typename T, int Lanes>
HCR_INLINE const float* as_paired_floats(const T* in, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return in;
  } else {
    widen_paired<T, Lanes>(in, buffer, n);
    return buffer;
  }
}

// The largest of p[0, n).
template <int Lanes>
HCR_INLINE float max_of(const float* p, int64_t n) {
  vfloat<Lanes> tops = vfloat<Lanes>{} - std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
    const vfloat<Lanes> x = load_v<Lanes>(p + i);
    tops = x > tops ? x : tops;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < Lanes; ++l) top = tops[l] > top ? tops[l] : top;
  for (; i < n; ++i) top = p[i] > top ? p[i] : top;
  return top;
}

// One chunk's scores p[0, n) of a query row into its running softmax: top (the largest score so far) and
// total (the sum of exp(score - top) so far) grow to cover the chunk, the row's value accumulators acc[0, D)
// are rescaled with total where top grows, and p becomes exp(p - top), the chunk's weights for pass 2.
// Every exponent is <= 0, so nothing overflows whatever the chunk order.
template <int Lanes>
HCR_INLINE void fold_into_softmax(float* p, int64_t n, float& top, float& total, float* acc, int64_t D) {
  const float new_top = std::max(top, max_of<Lanes>(p, n));
  if (new_top > top && total > 0.0f) {  // total is 0 before the row's first visible chunk
    const float factor = exp_approx(top - new_top);
    total *= factor;
    for (int64_t d = 0; d < D; ++d) acc[d] *= factor;
  }
  top = new_top;
  vfloat<Lanes> sum{};
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
    const vfloat<Lanes> e = exp_nonpositive_v<Lanes>(load_v<Lanes>(p + i) - top);
    store_v<Lanes>(p + i, e);
    sum += e;
  }
  float chunk_total = halving_sum<Lanes>(sum);
  for (; i < n; ++i) {
    p[i] = exp_approx(p[i] - top);
    chunk_total += p[i];
  }
  total += chunk_total;
}

// Slots per chunk of the span: a chunk's key and value rows (row_bytes each) fill at most a quarter of this
// core's L2 each; whole blocks of pass 2's value rows, at least one. The size within that bound hardly
// matters now that pass 1 no longer asks for the values: on an Intel Xeon (2 MiB L2, so one 2,048-slot
// chunk for a 1.5B row) chunks of 256, 512 and 1,024 slots took 0.98-1.02x the time at 1.5B bf16 B 1 and
// B 8, and 0.95-1.01x on the tiny model at 1,700 slots (alternating in one process, 10 rounds).
// Tests set a chunk of a few slots (any size is correct), so that small spans cross chunk boundaries; 0 = the
// L2 rule.
std::atomic<int64_t> chunk_slots_override{0};

int64_t chunk_slots(int64_t row_bytes) {
  const int64_t chosen = chunk_slots_override.load(std::memory_order_relaxed);
  return chosen > 0 ? chosen : std::max<int64_t>(1, l2_bytes() / 4 / row_bytes / kSlotBlock) * kSlotBlock;
}

struct Shape {
  int64_t B, Hq, Hkv, T, S, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // strides of dims 0..2 (dim 3 has stride 1)
};

// A thread's working memory for the tasks it runs in one call: allocated at its first task and reused by the
// next ones (eight allocations per task cost ~1 us of a 2-4 us task at a decode step's short caches).
struct Scratch {
  std::vector<float> q, acc, row, top, total, scores;  // top, total: each query row's running softmax
  std::vector<int64_t> first, last;                     // each query row's visible slots
  std::vector<uint16_t> tile_queries, tile_keys;        // the AMX pass's operands (tile_scores)
  std::vector<uint16_t> pair_queries;                   // the query rows as stored, for pass 1 in bf16 pairs
};

// Pass 1 on AMX tiles (Isa::amx, bf16 caches, D a multiple of 32). A tile dot product (tdpbf16ps) takes 16
// key rows by 32 elements of D against up to 16 query rows and adds 16 x 16 fp32 sums of bf16 products: the
// 6 query rows x 16 keys x 128 elements an AVX-512 sweep does in 48 FMAs plus widening and cross-lane sums
// take 4 tile loads of keys and 4 dot products. The keys are the tiles' A operand straight from the cache
// (16 rows, any row stride); the queries are the B operand, packed once per block of queries (groups of
// kTileRows rows, pack_operand_row in amx_tiles.h). The sums come out key-major and are scattered into the scores'
// query-major rows, times the scale (applied to each sum: the tile multiplies the unscaled bf16 query).
#if HCR_HAS_ISA_VARIANTS
// Tile 0 += keys x queries[chunk] over the chunks of D (at most 4) for 16 key rows at `keys`, queries in tiles
// 4-7, and the same into tile 3 for the 16 rows at `more`: two independent chains of dot products, so one
// block's products overlap the other's instead of waiting on their own accumulator.
HCR_TARGET_AMX inline void two_blocks_against_resident_queries(const uint16_t* keys, const uint16_t* more,
                                                                int64_t row_bytes, int64_t chunks) {
  _tile_zero(0);
  _tile_zero(3);
  _tile_loadd(1, keys, row_bytes);
  _tile_loadd(2, more, row_bytes);
  _tile_dpbf16ps(0, 1, 4);
  _tile_dpbf16ps(3, 2, 4);
  if (chunks > 1) {
    _tile_loadd(1, keys + 32, row_bytes);
    _tile_loadd(2, more + 32, row_bytes);
    _tile_dpbf16ps(0, 1, 5);
    _tile_dpbf16ps(3, 2, 5);
  }
  if (chunks > 2) {
    _tile_loadd(1, keys + 64, row_bytes);
    _tile_loadd(2, more + 64, row_bytes);
    _tile_dpbf16ps(0, 1, 6);
    _tile_dpbf16ps(3, 2, 6);
  }
  if (chunks > 3) {
    _tile_loadd(1, keys + 96, row_bytes);
    _tile_loadd(2, more + 96, row_bytes);
    _tile_dpbf16ps(0, 1, 7);
    _tile_dpbf16ps(3, 2, 7);
  }
}

// dst[n * width + j] = sums[j * 16 + n] * scale for the `rows` query rows n and `count` key rows j of a tile's
// key-major sums: one gather per query row of a whole block.
HCR_TARGET_AMX void scatter_tile_sums(const float* sums, int64_t count, int64_t rows, float scale, float* dst,
                                      int64_t width) {
  for (int64_t n = 0; n < rows; ++n) {
    if (count == kTileRows) {
      _mm512_storeu_ps(dst + n * width, _mm512_mul_ps(tile_column(sums, n), _mm512_set1_ps(scale)));
    } else {
      for (int64_t j = 0; j < count; ++j) dst[n * width + j] = sums[j * kTileRows + n] * scale;
    }
  }
}

// scores[r * width + slot - c0] for every query row r < R and slot in [c0, c1] (width = c1 - c0 + 1), from
// bf16 keys (row stride k_stride) and the packed queries; blocks of 16 key rows, the last one shifted back to
// end at c1 as in the vector pass, a chunk shorter than a block copied into `pad` (16 rows of D, the rest
// zeros), so every score is the same tile sum wherever its slot falls. One group of query rows with D <= 128
// (a decode step's) keeps the queries in tiles and takes two blocks at a time. No keys are asked for ahead:
// on the Intel Xeon the vector pass measured the same without (its prefetch is kept for the AMD EPYCs).
HCR_TARGET_AMX void tile_scores(const uint16_t* queries, int64_t R, int64_t D, const uint16_t* keys, int64_t k_stride,
                                int64_t c0, int64_t c1, float scale, float* scores, uint16_t* pad) {
  load_square_tile_config();  // tile 0 (and 3) the sums, 1 and 2 keys (or queries), 4-7 one group's queries
  const int64_t width = c1 - c0 + 1, chunks = D / 32, groups = (R + kTileRows - 1) / kTileRows;
  alignas(64) float sums[2][kTileRows * kTileRows];  // sums[block][key * 16 + query]
  const auto scatter = [&](const float* block_sums, int64_t start, int64_t count, int64_t g) {
    scatter_tile_sums(block_sums, count, std::min(kTileRows, R - g * kTileRows), scale,
                      scores + g * kTileRows * width + start - c0, width);
  };
  if (width < kTileRows) {
    zero_padded_block(keys + c0 * k_stride, k_stride, width, D, pad);
    tile_memory_barrier();
    for (int64_t g = 0; g < groups; ++g) {
      block_times_packed(pad, D * 2, queries + g * chunks * kTileElements, chunks);
      _tile_stored(0, sums[0], kTileRows * 4);
      tile_memory_barrier();
      scatter(sums[0], c0, width, g);
    }
  } else if (groups == 1 && chunks <= 4) {
    _tile_loadd(4, queries, 64);
    if (chunks > 1) _tile_loadd(5, queries + kTileElements, 64);
    if (chunks > 2) _tile_loadd(6, queries + 2 * kTileElements, 64);
    if (chunks > 3) _tile_loadd(7, queries + 3 * kTileElements, 64);
    const int64_t blocks = (width + kTileRows - 1) / kTileRows;
    for (int64_t b = 0; b < blocks; b += 2) {
      const int64_t first = std::min(c0 + b * kTileRows, c1 + 1 - kTileRows);
      const int64_t second = std::min(c0 + (b + 1) * kTileRows, c1 + 1 - kTileRows);  // = first past the last block
      two_blocks_against_resident_queries(keys + first * k_stride, keys + second * k_stride, k_stride * 2, chunks);
      _tile_stored(0, sums[0], kTileRows * 4);
      _tile_stored(3, sums[1], kTileRows * 4);
      tile_memory_barrier();
      scatter(sums[0], first, kTileRows, 0);
      if (b + 1 < blocks) scatter(sums[1], second, kTileRows, 0);
    }
  } else {
    for (int64_t b0 = c0; b0 <= c1; b0 += kTileRows) {
      const int64_t start = std::min(b0, c1 + 1 - kTileRows);
      for (int64_t g = 0; g < groups; ++g) {
        block_times_packed(keys + start * k_stride, k_stride * 2, queries + g * chunks * kTileElements, chunks);
        _tile_stored(0, sums[0], kTileRows * 4);
        tile_memory_barrier();
        scatter(sums[0], start, kTileRows, g);
      }
    }
  }
  _tile_release();
}
#endif

// Whether pass 1 runs on AMX tiles for these caches (see tile_scores).
template <typename T, int Lanes>
bool scores_on_tiles(int64_t D) {
#if HCR_HAS_ISA_VARIANTS
  return Lanes == 16 && std::is_same_v<T, c10::BFloat16> && D % 32 == 0 && active_isa() == Isa::amx;
#else
  return false;
#endif
}

// Pass 1's blocks of Lanes key rows over the chunk [c0, c1] of a span that ends at hi (at least a block wide), the
// last one shifted back to end at c1 (recomputing a few scores, bit for bit the same): scores[r * width + slot - c0]
// for the R query rows, the key rows kKeyPrefetchBytes ahead asked for as they go (score_chunk says why).
template <typename T, int Lanes, typename Q>
HCR_INLINE void score_blocks(const Q* q, const T* k_base, int64_t k_stride, int64_t R, int64_t D, float scale,
                             int64_t c0, int64_t c1, int64_t hi, float* scores) {
  const int64_t width = c1 - c0 + 1;
  const int64_t key_ahead = std::max<int64_t>(Lanes, kKeyPrefetchBytes / (D * int64_t(sizeof(T))));  // D >= 1 here
  for (int64_t b0 = c0; b0 <= c1; b0 += Lanes) {
    const int64_t start = std::min(b0, c1 + 1 - Lanes);
    const int64_t ahead = start + key_ahead;  // the first row asked for, if a row of the span
    rows_block_dots<T, Lanes>(q, k_base + start * k_stride, k_stride, R, D, scale, scores + start - c0, width,
                              ahead <= hi ? k_base + ahead * k_stride : nullptr, hi + 1 - ahead);
  }
}

// Whether pass 1 multiplies bf16 pairs (block_dots with bf16 query rows): the avx512_bf16 level, bf16 caches, D a
// multiple of 32 (amx takes tiles there). vdpbf16ps does two products a lane where an FMA does one, and needs no
// widening: on an AMD EPYC (Zen 4, whose 512-bit FMAs take both 256-bit pipes) it runs one a cycle, as 512-bit
// FMAs do, so twice their products (12 chains of each, registers only; an earlier loop had given 2.6-2.8x). The
// 1.5B bf16 step with its caches from memory, both levels in one process alternating (the L3 read over before each
// call, 2 threads, 3 runs of 20 rounds; time pairs / widened): B 1 0.95, 0.92, 0.93; B 8 0.85, 0.91, 0.93 (at
// 87-88 % of a read's speed where the widened pass was at 75-80 %).
// Not measured on an Intel CPU (the Xeon here has AMX, whose tiles take this pass).
template <typename T, int Lanes>
constexpr bool kPairsPossible = HCR_HAS_ISA_VARIANTS && Lanes == 16 && std::is_same_v<T, c10::BFloat16>;

template <typename T, int Lanes>
bool scores_in_pairs(int64_t D) {
#if HCR_HAS_ISA_VARIANTS
  return kPairsPossible<T, Lanes> && D % 32 == 0 && active_isa() == Isa::avx512_bf16;
#else
  return false;
#endif
}

// One (row b, key/value head h) task: every query of the group's heads and the step's steps.
template <typename T>
struct AttendGroup {
  // Pass 1 over the chunk [c0, c1] of the span (which ends at hi): every query row's score at every slot
  // (all written, whichever row sees them; the softmax and pass 2 use each row's own slots only) into
  // scores[r * width + slot - c0]: blocks of Lanes key rows (score_blocks); a chunk shorter than a block goes
  // slot by slot (in fp32 on every level).
  // Beside each block of keys, the key rows kKeyPrefetchBytes ahead are asked for into the outer caches:
  // without it a block's arithmetic and the wait for its keys add up (pass 1 ran at about half a plain
  // read's speed from memory, and at the same time per byte from the L2). Measured side by side, with the
  // value rows of each block asked for too (2 threads, 3-4 runs, time / a warmed read of the same bytes):
  // 1,700 slots T = 1 1.80 -> 1.36 (AVX-512), 1.51 -> 1.33 (AVX2 variant); 1.5B bf16 B1 1.37 -> 1.00,
  // B8 0.76 -> 0.57; re-encode T = 6 unchanged; the tiny model at 256 slots, whose 8 MB of keys and values
  // sit in the L3, 1.35 -> 1.45. 8-16 KiB ahead measured alike, 32-128 KiB less good (1.44-1.51), into the
  // L1 (16 KiB ahead) much slower than none (AMD EPYC, 1 MiB L2). Once keys were widened in registers,
  // asking for the values too (into the L2, for pass 2) gained nothing and cost time at some shapes (AVX2
  // EPYC, 512 KiB L2, 2 threads, the kernel with and without it and the previous kernel built into one
  // process, alternating; time / the previous kernel's, two runs: 1.5B B1 1.13, 1.07 with vs 1.01, 1.04
  // without; B8 1.23, 1.03 vs 1.06, 0.96; 256 slots 0.96, 0.90 vs 0.87, 0.86), nor did asking for pass
  // 2's next block of values there (B1 0.94, 0.99 vs 0.90, 1.01; B8 1.03, 0.95 vs 1.07, 0.96). So pass 1
  // asks for keys only; pass 2 asks for its value rows itself, as it sweeps them (kValuePrefetchRows).
  // (On an AVX-512 EPYC with a 1 MiB L2 the value prefetch had gained 1.04-1.39x at
  // 1.7k-2k slots, with keys converted into an L1 block first; not measured there since.)
  // The block's 8 or 16 rows ahead are asked for as the block's own rows are read (block_dots), not all before
  // the block: with the caches coming from memory (the L3 read over before each call), asking KR rows beside each
  // KR key rows summed took 0.94-0.97x the time of asking all at once at 1.5B bf16 B 1 on the AVX2 path, 0.89-0.96x
  // at B 8, 0.94 / 0.95x on `avx512`; a line of the rows ahead as each line of the rows summed is reached, against
  // KR rows at a time: AVX2 path B 1 0.96-0.98x (and one run 1.11x), B 8 0.97-0.98x, `avx512` 0.99 / 0.95x (Intel
  // Xeon, 300 MiB L3, 2 threads, alternating in one process, 2-4 runs of 20-30 rounds). Presumably a burst of 16-32
  // requests at a block's start waits on the core's few line fill buffers (the VM shows no counters to confirm it),
  // while spread they go out as the FMAs run.
  // (amx's tile pass asking for keys ahead in bursts measured 0.96-1.11x: noise; it asks for none.)
  // (The automatic route still times the kernel against the model's own attention on every machine.)
  // pair_q: the query rows as stored (bf16, unscaled) where pass 1 multiplies bf16 pairs (scores_in_pairs), else
  // nullptr; q: the same rows scaled, in fp32, for a chunk shorter than a block (and every other chunk without pairs).
  template <int Lanes>
  static HCR_INLINE void score_chunk(const float* q, const uint16_t* pair_q, float scale, const T* k_base, const Shape& s,
                                     int64_t G, int64_t R, int64_t c0, int64_t c1, int64_t hi, float* scores, float* row) {
    const int64_t D = s.D;
    if (c1 - c0 + 1 < Lanes) {
      const int64_t width = c1 - c0 + 1;
      for (int64_t slot = c0; slot <= c1; ++slot) {
        const float* k = as_paired_floats<T, Lanes>(k_base + slot * s.k_stride[2], row, D);
        for (int64_t r = 0; r < R; r += G) group_dots<Lanes>(q + r * D, k, G, D, scores + r * width + slot - c0, width);
      }
      return;
    }
    if constexpr (kPairsPossible<T, Lanes>) {
      if (pair_q != nullptr) return score_blocks<T, Lanes>(pair_q, k_base, s.k_stride[2], R, D, scale, c0, c1, hi, scores);
    }
    score_blocks<T, Lanes>(q, k_base, s.k_stride[2], R, D, 1.0f, c0, c1, hi, scores);
  }

  template <int Lanes>
  static HCR_INLINE void run(const T* query, const T* keys, const T* values, const int64_t* positions, T* out,
                             const Shape& s, float scale, int64_t window, int64_t b, int64_t h, Scratch& scratch) {
    const int64_t G = s.Hq / s.Hkv, D = s.D;
    const int64_t steps_per_block = std::max<int64_t>(1, kBlockQueries / G);
    const T* k_base = keys + b * s.k_stride[0] + h * s.k_stride[1];
    const T* v_base = values + b * s.v_stride[0] + h * s.v_stride[1];
    const int64_t rows = steps_per_block * G;  // more than kBlockQueries where one step's G heads are more
    auto& [q, acc, row, top, total, scores, first, last, tile_queries, tile_keys, pair_queries] = scratch;
    q.resize(rows * D), acc.resize(rows * D), row.resize(D), top.resize(rows), total.resize(rows);
    first.resize(rows), last.resize(rows);
    const bool tiles = scores_on_tiles<T, Lanes>(D), pairs = scores_in_pairs<T, Lanes>(D);
    if (pairs) pair_queries.resize(rows * D);
    if (tiles) {
      tile_queries.resize((rows + kTileRows - 1) / kTileRows * kTileRows * D), tile_keys.resize(kTileRows * D);
    }
    const int64_t chunk = chunk_slots(D * int64_t(sizeof(T)));  // slots per chunk of a span (the same for every block)
    for (int64_t t0 = 0; t0 < s.T; t0 += steps_per_block) {
      const int64_t t1 = std::min(s.T, t0 + steps_per_block), R = (t1 - t0) * G;
      if (tiles && R % kTileRows != 0) {  // the last group's unused columns: zeros (its rows are packed below)
        const int64_t last_group = R / kTileRows * kTileRows * D;
        std::fill(tile_queries.begin() + last_group, tile_queries.begin() + last_group + kTileRows * D, uint16_t{0});
      }
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t pos = positions[b * s.T + t];
        const int64_t from = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        lo = std::min(lo, from), hi = std::max(hi, pos);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (t - t0) * G + g;
          first[r] = from, last[r] = pos;
          const T* src = query + b * s.q_stride[0] + (h * G + g) * s.q_stride[1] + t * s.q_stride[2];
          if (tiles) {  // unscaled bf16, as the tiles multiply them (tile_scores scales the sums)
            pack_operand_row(reinterpret_cast<const uint16_t*>(src), r, D, tile_queries.data());
          } else {
            widen_paired<T, Lanes>(src, q.data() + r * D, D);
            for (int64_t d = 0; d < D; ++d) q[r * D + d] *= scale;
            if (pairs) std::memcpy(pair_queries.data() + r * D, src, D * sizeof(uint16_t));
          }
        }
      }
      // The span [lo, hi] goes in chunks whose keys and values fit in half the L2 together (see chunk_slots):
      // pass 1 scores a chunk's keys for every query row (asking for the keys ahead), the chunk's scores
      // become exponentials against each row's running maximum (folding the chunk into the row's running
      // sum, and rescaling the sum and accumulators of earlier chunks where the maximum grows), and pass 2
      // sums the chunk's values into the accumulators (the first sweep over a block asking for value rows ahead; the
      // steps' rows together over the slots they all see where a step's heads do not fill whole sweeps).
      std::fill(acc.begin(), acc.begin() + R * D, 0.0f);
      std::fill(top.begin(), top.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.begin() + R, 0.0f);
      for (int64_t c0 = lo; c0 <= hi; c0 += chunk) {
        const int64_t c1 = std::min(hi, c0 + chunk - 1), width = c1 - c0 + 1;
        scores.resize(std::max<int64_t>(int64_t(scores.size()), R * width));
        if (tiles) {
#if HCR_HAS_ISA_VARIANTS
          tile_scores(tile_queries.data(), R, D, reinterpret_cast<const uint16_t*>(k_base), s.k_stride[2], c0, c1, scale,
                      scores.data(), tile_keys.data());
#endif
        } else {
          score_chunk<Lanes>(q.data(), pairs ? pair_queries.data() : nullptr, scale, k_base, s, G, R, c0, c1, hi,
                             scores.data(), row.data());
        }
        for (int64_t r = 0; r < R; ++r) {  // each query's own slots of the chunk; its other scores are never read
          const int64_t from = std::max(first[r], c0), to = std::min(last[r], c1);
          if (from <= to) {
            fold_into_softmax<Lanes>(scores.data() + r * width + from - c0, to - from + 1, top[r], total[r], acc.data() + r * D, D);
          }
        }
        const float* weights = scores.data() - c0;  // weights[r * width + slot]
        for (int64_t b0 = c0; b0 <= c1; b0 += kSlotBlock) {  // blocks of value rows that stay in L1
          const int64_t b1 = std::min(c1 + 1, b0 + kSlotBlock);
          int64_t shared0 = b0, shared1 = b1;  // the block's slots every step sees
          for (int64_t r = 0; r < R; r += G) shared0 = std::max(shared0, first[r]), shared1 = std::min(shared1, last[r] + 1);
          const bool joint = R > G && G % kSweepValueRows != 0 && shared0 < shared1;
          // The block's sweeps, summed at one call site (each call site inlines every sweep's code): with `joint`, sweep
          // 0 takes the steps' rows together over the shared slots (kSweepValueRows says why) and sweeps 1, 2, ... each
          // step's slots below and above them; else sweep i takes step i's G heads over its slots. Only the first sweep
          // over the block asks for rows ahead.
          const int64_t steps = R / G, count = joint ? 1 + 2 * steps : steps;
          int64_t ask_end = hi + 1;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t step = joint ? (i - 1) / 2 : i, r = step * G;
            int64_t from = std::max(b0, first[r]), to = std::min(b1, last[r] + 1), row = r, rows = G;
            if (joint && i == 0) {
              from = shared0, to = shared1, row = 0, rows = R;
            } else if (joint && i % 2 == 1) {
              to = shared0;  // the step's slots below the shared ones
            } else if (joint) {
              from = shared1;  // and above them
            }
            if (from < to) {
              group_weighted_sums<T, Lanes>(v_base, s.v_stride[2], weights + row * width, width, rows, from, to,
                                            acc.data() + row * D, D, ask_end);
              ask_end = 0;
            }
          }
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (t - t0) * G + g;
          T* dst = out + ((b * s.T + t) * s.Hq + h * G + g) * D;
          store_paired<T, Lanes>(acc.data() + r * D, 1.0f / total[r], dst, D);  // total >= 1: the maximum's own term
        }
      }
    }
  }
};

template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const int64_t* positions,
                at::Tensor& out, const Shape& shape, float scale, int64_t window) {
  const T* q = query.const_data_ptr<T>();
  const T* k = keys.const_data_ptr<T>();
  const T* v = values.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, shape.B * shape.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      run_for_active_isa<AttendGroup<T>>(q, k, v, positions, o, shape, scale, window, task / shape.Hkv,
                                         task % shape.Hkv, scratch);
    }
  });
}

}  // namespace

int64_t decode_attention_block_queries() { return kBlockQueries; }

int64_t decode_attention_chunk_slots(int64_t row_bytes) {
  TORCH_CHECK(row_bytes > 0, "decode_attention_chunk_slots: row_bytes must be positive, got ", row_bytes);
  return chunk_slots(row_bytes);
}

void decode_attention_set_chunk_slots(int64_t slots) {
  TORCH_CHECK(slots >= 0, "decode_attention_set_chunk_slots: slots must be >= 0 (0: the L2 rule), got ", slots);
  chunk_slots_override.store(slots, std::memory_order_relaxed);
}

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& positions, double scale, int64_t window) {
  const char* op = "hcr::decode_attention";
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && positions.device().is_cpu(),
              op, " (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 4, op, ": query must be [B, Hq, T, D], got ", query.sizes());
  TORCH_CHECK(keys.dim() == 4, op, ": keys must be [B, Hkv, S, D], got ", keys.sizes());
  TORCH_CHECK(values.sizes() == keys.sizes(), op, ": values must match keys ", keys.sizes(), ", got ", values.sizes());
  const int64_t B = query.size(0), Hq = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t Hkv = keys.size(1), S = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == D, op, ": keys must be [B, Hkv, S, D] = [", B, ", Hkv, S, ", D,
              "] to match query ", query.sizes(), ", got ", keys.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype, op, ": query is ", dtype, " but keys are ",
              keys.scalar_type(), " and values ", values.scalar_type());
  for (const auto* t : {&query, &keys, &values}) {
    TORCH_CHECK(D <= 1 || t->stride(3) == 1, op, ": query, keys and values must be contiguous along D, got strides ",
                t->strides());
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == B &&
                  positions.size(1) == T,
              op, ": positions must be int64 [B, T] = [", B, ", ", T, "], got ", positions.scalar_type(), " ",
              positions.sizes());
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < S, op, ": positions[", i / T, ", ", i % T, "] = ", p[i],
                " must be a slot of the cache, in [0, S) = [0, ", S, ")");
  }
  at::Tensor out = at::empty({B, T, Hq, D}, query.options());
  if (out.numel() == 0) return out;
  Shape shape{B, Hq, Hkv, T, S, D, {}, {}, {}};
  for (int d = 0; d < 3; ++d) {
    shape.q_stride[d] = query.stride(d), shape.k_stride[d] = keys.stride(d), shape.v_stride[d] = values.stride(d);
  }
  const float s = static_cast<float>(scale);
  switch (dtype) {
    case at::kFloat:
      attend_all<float>(query, keys, values, p, out, shape, s, window);
      break;
    case at::kBFloat16:
      attend_all<c10::BFloat16>(query, keys, values, p, out, shape, s, window);
      break;
    default:
      attend_all<c10::Half>(query, keys, values, p, out, shape, s, window);
  }
  return out;
}

}  // namespace hcr

TORCH_LIBRARY_FRAGMENT(hcr, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor positions, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(hcr, CPU, m) { m.impl("decode_attention", &hcr::decode_attention_cpu); }
