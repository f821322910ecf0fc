#pragma once
// Row arithmetic shared by the CPU kernels: loops the compiler vectorises (-O3, omp
// simd), with keys and values read as float32 whatever their storage dtype.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

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
  typedef _Float16 f16x16 __attribute__((vector_size(32)));
  f16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x16);
}

inline float hsum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
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

template <typename T>
inline float sq_dist(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i] - to_float(b[i]);
    acc += x * x;
  }
  return acc;
}

// y += a * x
template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

}  // namespace kmem
