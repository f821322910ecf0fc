#pragma once
// Intel AMX tiles for bfloat16 keys: search's scan where the CPU has them (Sapphire
// Rapids and later) and the kernel grants the process their state.
//
// One TDPBF16PS multiplies a [16 x 32] bf16 tile by a [32 x 16] one into [16 x 16]
// float32: 8,192 products, 16x what one AVX-512 FMA retires, so at B <= 64 the scan of
// bf16 keys is bound by reading them, not by the arithmetic. Key rows are the left
// operand, loaded straight from the memory's row-major buffer (16 rows x 32 dims, the
// row stride d); queries are the right one, packed once per search in the "VNNI"
// layout the instruction reads (each tile row a pair of dimensions of 16 queries).
//
// Queries stay float32: each is split exactly enough into three bf16 parts
// (q = hi + mid + lo up to float32 rounding) whose products with the bf16 keys are
// exact in float32, so a score differs from the AVX-512 scan's only by summation
// order -- the ranking contract of every backend, not a bf16 rounding of the queries.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#define KMEM_AMX 1

namespace kmem::amx {

constexpr int kRows = 16;   // key rows per tile
constexpr int kDims = 32;   // dimensions per tile (bf16 pairs: 16)
constexpr int kCols = 16;   // queries per tile
constexpr int kParts = 3;   // bf16 parts of a float32 query
constexpr int kMaxGroups = 4;  // accumulator tiles tmm0..3: 64 queries

// Whether this process may use the tiles: Linux hands out their 8 KB of state only on
// request (arch_prctl), once per process; a CPU without AMX refuses it.
inline bool available() {
  static const bool ok = [] {
    constexpr int kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// The palette every tile here uses: 8 tiles of 16 rows x 64 bytes.
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  Config() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// A thread's use of the tiles: configured on entry, released on exit.
struct Tiles {
  Tiles() {
    static const Config config;
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// Queries [B <= 64, d] (d a multiple of 32) as right-hand tiles: for query group g, part
// p and dimension chunk c, tile(g, p, c) is 16 rows (dimension pairs) x 16 queries of
// packed bf16 pairs; queries past B are zeros.
class Queries {
 public:
  Queries(const float* q, int64_t B, int64_t d)
      : groups_((B + kCols - 1) / kCols), chunks_(d / kDims), pack_(groups_ * kParts * chunks_ * 256, 0u) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < d; ++i) {
        float rest = q[b * d + i];
        for (int p = 0; p < kParts; ++p) {
          const at::BFloat16 h(rest);  // rounded to nearest even
          rest -= to_float(h);
          uint32_t& pair = pack_[offset(b / kCols, p, i / kDims) + (i % kDims) / 2 * kCols + b % kCols];
          pair |= static_cast<uint32_t>(h.x) << (16 * (i % 2));
        }
      }
    }
  }
  int64_t groups() const { return groups_; }
  int64_t chunks() const { return chunks_; }
  const uint32_t* tile(int64_t g, int p, int64_t c) const { return pack_.data() + offset(g, p, c); }

 private:
  int64_t offset(int64_t g, int p, int64_t c) const { return ((g * kParts + p) * chunks_ + c) * 256; }
  int64_t groups_, chunks_;
  std::vector<uint32_t> pack_;
};

// Scores of 32 key rows (bf16, row stride `stride` elements) against query groups g0 and,
// if NG == 2, g0 + 1, into out[row][query] (float32, row stride 64). Two key tiles
// (tmm4: rows 0-15, tmm5: rows 16-31) share each query tile (tmm6, tmm7), so the
// queries' tiles -- 96 KB at B = 64, past L1 -- are read once per 32 rows, not per 16;
// accumulators: tmm0 / tmm1 rows 0-15 of g0 / g0 + 1, tmm2 / tmm3 rows 16-31.
template <int NG>
inline void scores32(const Queries& qs, int64_t g0, const at::BFloat16* rows, int64_t stride, float* out) {
  static_assert(NG == 1 || NG == 2);
  const int64_t bytes = stride * sizeof(at::BFloat16);
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NG == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t c = 0; c < qs.chunks(); ++c) {
    _tile_loadd(4, rows + c * kDims, bytes);
    _tile_loadd(5, rows + kRows * stride + c * kDims, bytes);
    for (int p = 0; p < kParts; ++p) {
      _tile_loadd(6, qs.tile(g0, p, c), 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NG == 2) {
        _tile_loadd(7, qs.tile(g0 + 1, p, c), 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  constexpr int64_t ld = kMaxGroups * kCols;  // floats per row of `out`
  float* top = out + g0 * kCols;
  _tile_stored(0, top, ld * sizeof(float));
  _tile_stored(2, top + kRows * ld, ld * sizeof(float));
  if constexpr (NG == 2) {
    _tile_stored(1, top + kCols, ld * sizeof(float));
    _tile_stored(3, top + kRows * ld + kCols, ld * sizeof(float));
  }
}

// Scores of 32 key rows against every query group: out [32][64].
inline void scores32(const Queries& qs, const at::BFloat16* rows, int64_t stride, float* out) {
  for (int64_t g0 = 0; g0 < qs.groups(); g0 += 2) {
    if (g0 + 1 < qs.groups())
      scores32<2>(qs, g0, rows, stride, out);
    else
      scores32<1>(qs, g0, rows, stride, out);
  }
}

}  // namespace kmem::amx
#else
namespace kmem::amx {
class Queries {};  // this build does not target AMX: never constructed
}  // namespace kmem::amx
#endif
