#pragma once
// Row arithmetic shared by the CPU kernels: loops the compiler vectorises (-O3, omp
// simd), with keys and values read as float32 whatever their storage dtype.
#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace kmem {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * to_float(b[i]);
  return acc;
}

// Sixteen floats as one GCC vector: one zmm register under AVX-512, two ymm under AVX2
// (the build's -march decides), without intrinsics for either.
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const at::BFloat16* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;  // bf16 is float32's high half
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline f32x16 load16(const at::Half* p) {
#if defined(__AVX512F__)
  // GCC turns __builtin_convertvector on _Float16 into sixteen scalar converts: fp16 keys
  // were scanned at a quarter of bf16's speed (B = 1, 400k x 256: 94 vs 14 ms).
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  f32x16 out;
  std::memcpy(&out, &v, sizeof out);
  return out;
#else
  typedef _Float16 f16x16 __attribute__((vector_size(32)));
  f16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x16);
#endif
}

inline float hsum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The source lane (x: 0-15, y: 16-31) of lane `out` of a fold of `width`-lane groups:
// the first (hi = false) or second half of each group, x's groups then y's.
constexpr int fold_lane(int out, int width, bool hi) {
  const int half = width / 2, o = out % 8;
  return (out < 8 ? 0 : 16) + (o / half) * width + o % half + (hi ? half : 0);
}
template <int W, std::size_t... I>
inline f32x16 fold(f32x16 x, f32x16 y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, fold_lane(I, W, false)...) +
         __builtin_shufflevector(x, y, fold_lane(I, W, true)...);
}
template <int W>
inline f32x16 fold(f32x16 x, f32x16 y) {
  return fold<W>(x, y, std::make_index_sequence<16>{});
}
// Lane i of the result = the sum of v[i]'s lanes, for sixteen vectors: a tree of folds
// (15 adds and 30 shuffles for sixteen sums, where sixteen hsum() calls take ~100
// instructions). Each fold halves every vector's partial sums and packs two vectors
// into one, x's sums before y's, so the order of v is kept.
inline f32x16 reduce16(const f32x16* v) {
  f32x16 a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = fold<16>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) b[i] = fold<8>(a[2 * i], a[2 * i + 1]);
  return fold<2>(fold<4>(b[0], b[1]), fold<4>(b[2], b[3]));
}

// Bit l set where a[l] > b[l] (NaN never passes).
inline uint32_t greater_mask(f32x16 a, f32x16 b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ);
#else
  uint32_t m = 0;
  for (int l = 0; l < 16; ++l) m |= static_cast<uint32_t>(a[l] > b[l]) << l;
  return m;
#endif
}

// Bit l set unless a[l] < b[l]: where a may reach b (NaN included, to be looked at).
inline uint32_t reach_mask(f32x16 a, f32x16 b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_NLT_UQ);
#else
  uint32_t m = 0;
  for (int l = 0; l < 16; ++l) m |= static_cast<uint32_t>(!(a[l] < b[l])) << l;
  return m;
#endif
}

template <typename T>
inline float sq_norm(const T* a, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(a[i]);
    acc += x * x;
  }
  return acc;
}

// Dot products of `a` [n] with R gathered rows (L2: their squared distances from `a`),
// each row with its own accumulator and the same operations in the same order, so a
// row's result never depends on the rows beside it.
template <int R, bool L2, typename T>
inline void row_scores(const float* a, const T* const (&rows)[R], int64_t n, float (&out)[R]) {
  f32x16 acc[R] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 av = load16(a + i);
    for (int r = 0; r < R; ++r) {
      const f32x16 x = load16(rows[r] + i);
      if constexpr (L2) {
        const f32x16 t = av - x;
        acc[r] += t * t;
      } else {
        acc[r] += av * x;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc[r]);
    for (int64_t m = i; m < n; ++m) {
      const float x = to_float(rows[r][m]);
      s += L2 ? (a[m] - x) * (a[m] - x) : a[m] * x;
    }
    out[r] = s;
  }
}

// y += a * x
template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

}  // namespace kmem
