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

// out[i] = q_i . b for `count` (<= 4) queries q_i = q + i * stride: independent
// accumulators for one row read, where separate dot() calls would wait on each other.
template <typename T>
inline void dot4(const float* q, int64_t stride, int64_t count, const T* b, int64_t n, float* out) {
  const float* q0 = q;
  const float* q1 = count > 1 ? q + stride : q;
  const float* q2 = count > 2 ? q + 2 * stride : q;
  const float* q3 = count > 3 ? q + 3 * stride : q;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(b[i]);
    a0 += q0[i] * x;
    a1 += q1[i] * x;
    a2 += q2[i] * x;
    a3 += q3[i] * x;
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
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
