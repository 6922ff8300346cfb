// AMX tile helpers shared by the kernels with a tile path (Isa::amx: decode_attention's bf16 scores,
// decode_linear's bf16 rows).
//
// A tile dot product (tdpbf16ps) adds to a 16 x 16 fp32 tile the products of an A tile (16 rows of 32 bf16
// values, loaded from memory with any row stride) and a B tile (16 rows of 16 pairs: for output column n,
// the pairs (b[n][2i], b[n][2i + 1]) of 32 values of column n's operand row). Both kernels take rows of
// memory as A (key rows, weight rows) and pack up to 16 rows of their other operand (queries, input rows)
// as B once per call; the sums come out A-row-major.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"

#if defined(__x86_64__)
#include <immintrin.h>  // AMX tile intrinsics, used in HCR_TARGET_AMX functions only
#endif

namespace hcr {

constexpr int64_t kTileRows = 16;  // A rows per tile, and B columns (packed operand rows) per group

// Elements of one group's packed operand for one chunk of 32 (a B tile: 16 rows of 64 bytes).
constexpr int64_t kTileElements = kTileRows * 32;

// Operand row r (D values, D a multiple of 32) into the packed B operand: per group of 16 rows and chunk of
// 32 values, 16 tile rows of 16 pairs (x[n][2i], x[n][2i + 1]), one column n per row of the group.
inline void pack_operand_row(const uint16_t* row, int64_t r, int64_t D, uint16_t* packed) {
  uint16_t* column = packed + (r / kTileRows) * (D / 32) * kTileElements + (r % kTileRows) * 2;
  for (int64_t c = 0; c < D / 32; ++c)
    for (int64_t i = 0; i < kTileRows; ++i) {
      uint16_t* pair = column + c * kTileElements + i * kTileRows * 2;
      pair[0] = row[c * 32 + 2 * i], pair[1] = row[c * 32 + 2 * i + 1];
    }
}

// Rows of a block of fewer than 16 (`count` rows of D values, `stride` apart) copied into `pad` (16 rows of
// D), the rest zeros: a tile then loads 16 rows without reading past the last one, and the copied rows'
// sums are the same tile sums they would be in a full block.
inline const uint16_t* zero_padded_block(const uint16_t* rows, int64_t stride, int64_t count, int64_t D,
                                         uint16_t* pad) {
  std::fill(pad + count * D, pad + kTileRows * D, uint16_t{0});
  for (int64_t j = 0; j < count; ++j) std::copy(rows + j * stride, rows + j * stride + D, pad + j * D);
  return pad;
}

#if HCR_HAS_ISA_VARIANTS
struct alignas(64) TileConfig {  // ldtilecfg's 64 bytes: palette 1, then per tile its bytes per row and rows
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 all 16 rows of 64 bytes (16 fp32 sums or 32 bf16 values a row): what both kernels use.
HCR_TARGET_AMX inline void load_square_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = kTileRows;
  _tile_loadconfig(&config);
}

// Column n of a stored 16 x 16 fp32 tile (sums[j * 16 + n] for j < 16), one gather: the tiles' sums come out
// A-row-major, the kernels' outputs are operand-row-major.
HCR_TARGET_AMX inline __m512 tile_column(const float* sums, int64_t n) {
  const __m512i rows = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  return _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(int(n))), sums, 4);
}

// The tile intrinsics are asm statements that name no memory: the compiler must not move a buffer's stores
// past a tile load of it, nor its loads before the tile store that wrote it.
inline void tile_memory_barrier() { asm volatile("" ::: "memory"); }

// Tile 0 = the 16 rows at `rows` (row_bytes apart) x one group's packed operand, over `chunks` chunks of 32.
HCR_TARGET_AMX inline void block_times_packed(const uint16_t* rows, int64_t row_bytes, const uint16_t* packed,
                                              int64_t chunks) {
  _tile_zero(0);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(1, rows + c * 32, row_bytes);
    _tile_loadd(2, packed + c * kTileElements, 64);
    _tile_dpbf16ps(0, 1, 2);
  }
}

// The same for two blocks of 16 rows, into tiles 0 and 3, each chunk of the operand loaded once for both:
// two independent chains of dot products, so one block's products overlap the other's.
HCR_TARGET_AMX inline void two_blocks_times_packed(const uint16_t* rows, const uint16_t* more, int64_t row_bytes,
                                                   const uint16_t* packed, int64_t chunks) {
  _tile_zero(0);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, packed + c * kTileElements, 64);
    _tile_loadd(1, rows + c * 32, row_bytes);
    _tile_loadd(2, more + c * 32, row_bytes);
    _tile_dpbf16ps(0, 1, 4);
    _tile_dpbf16ps(3, 2, 4);
  }
}
#endif

}  // namespace hcr
