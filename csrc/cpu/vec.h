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
