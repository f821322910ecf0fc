// What the CUDA kernels of kmem share (one header, included by search.cu, attend.cu and
// dense.cu): block sizes, dtype conversion, the packed (score, slot) keys of the top-k,
// warp and block reductions, row scores, exclusion look-ups, the launch helper and the
// dispatch over key and value dtypes. Device code only: no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "topk_attention.cuh"

namespace kmem {
namespace cuda {
namespace detail {

inline constexpr int64_t kNoRow = -9223372036854775807LL - 1;  // INT64_MIN: below every real row
inline constexpr int kThreads = 256;                            // block size of most kernels
inline constexpr int kWarps = kThreads / 32;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef KMEM_CUDA_SIM  // the CPU simulator of the tests (csrc/cuda/sim)
  return reinterpret_cast<T*>(sim::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
#endif
}

// x's bits with the mantissa cut to TF32's 10 bits.
__device__ __forceinline__ unsigned tf32_bits(float x) { return __float_as_uint(x) & 0xFFFFE000u; }

// d += a b on tensor cores: one m16n8k8 MMA by the whole warp, A [16, 8] and B [8, 8]
// in TF32 (each operand's mantissa cut to 10 bits), float32 accumulation. Lane l holds,
// with g = l / 4 and c = l % 4: a = A[g][c], A[g+8][c], A[g][c+4], A[g+8][c+4];
// b = B[c][g], B[c+4][g]; d = D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1] (the PTX
// ISA's fragment layout). sm_80 and later; the host never selects it below.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
#ifdef KMEM_CUDA_SIM
  sim_mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  // The cut is explicit, so every GPU and the simulator read the same operands.
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(tf32_bits(a[0])), "r"(tf32_bits(a[1])), "r"(tf32_bits(a[2])), "r"(tf32_bits(a[3])),
        "r"(tf32_bits(b[0])), "r"(tf32_bits(b[1])));
#endif
}

// d += a b to about float32's accuracy on tensor cores (3xTF32): each operand is split
// into a TF32 head and the float32 rest, and the three products that matter -- rest x
// head, head x rest, head x head -- go through mma_tf32 (the rest x rest term is below
// float32's rounding). Same fragments as mma_tf32.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  float ah[4], al[4], bh[2], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ah[i] = __uint_as_float(tf32_bits(a[i]));
    al[i] = a[i] - ah[i];
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    bh[i] = __uint_as_float(tf32_bits(b[i]));
    bl[i] = b[i] - bh[i];
  }
  mma_tf32(d, al, bh);
  mma_tf32(d, ah, bl);
  mma_tf32(d, ah, bh);
}

__device__ __forceinline__ int64_t pack(float score, int64_t slot) {
  if (score == 0.0f) score = 0.0f;  // -0.0 and +0.0 must tie (survives fast-math, unlike + 0.0f)
  int32_t bits = __float_as_int(score);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(bits)) << 32;
  return static_cast<int64_t>(high | (0xFFFFFFFFull - static_cast<uint64_t>(slot)));
}

__device__ __forceinline__ float packed_score(int64_t key) {
  if (key == kNoRow) return kNegInf;
  int32_t bits = static_cast<int32_t>(key >> 32);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  return __int_as_float(bits);
}

__device__ __forceinline__ int64_t packed_slot(int64_t key) {
  return key == kNoRow ? -1 : static_cast<int64_t>(0xFFFFFFFFull - (static_cast<uint64_t>(key) & 0xFFFFFFFFull));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum (or max) of v over the block, returned to every thread. `red` holds one value per
// warp; the trailing barrier lets the caller reuse it at once.
__device__ inline float block_reduce(float v, bool is_max, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = is_max ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = is_max ? kNegInf : 0.0f;
  for (int i = 0; i < warps; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
  __syncthreads();
  return r;
}

// Stages rows [0, nr) x columns [c0, c0 + Cols) of the row-major matrix `src` (rows
// `width` elements apart) into shared memory, by the whole block: put(i, c, x) stores
// element (i, c0 + c) as float; 0 past nr rows or past `width` columns. A whole tile
// issues all of a thread's loads into registers before its first store, so each thread
// keeps Rows Cols / kThreads loads in flight: one bounds-checked load and store at a
// time had left a block a few KB in flight, far from what hides HBM's latency.
template <int Rows, int Cols, typename T, typename Put>
__device__ __forceinline__ void stage_tile(const T* src, int64_t width, int64_t nr, int64_t c0, Put&& put) {
  static_assert(Rows * Cols % kThreads == 0, "whole loads per thread");
  constexpr int kPer = Rows * Cols / kThreads;
  constexpr int kBatch = kPer < 8 ? kPer : 8;  // loads in flight per thread: more costs registers
  static_assert(kPer % kBatch == 0, "whole batches");
  const int t = threadIdx.x;
  if (nr >= Rows && c0 + Cols <= width) {
#pragma unroll 1  // batch by batch: unrolled, the compiler hoists every load and runs out of registers
    for (int u0 = 0; u0 < kPer; u0 += kBatch) {
      float v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int e = t + (u0 + u) * kThreads;
        v[u] = to_float(src[static_cast<int64_t>(e / Cols) * width + c0 + e % Cols]);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int e = t + (u0 + u) * kThreads;
        put(e / Cols, e % Cols, v[u]);
      }
    }
    return;
  }
  for (int e = t; e < Rows * Cols; e += kThreads) {
    const int i = e / Cols, c = e % Cols;
    put(i, c, i < nr && c0 + c < width ? to_float(src[static_cast<int64_t>(i) * width + c0 + c]) : 0.0f);
  }
}

// Score of one key row against q, by one warp (lanes stride over d): every lane gets it.
template <typename KT>
__device__ inline float warp_row_score(const float* q, const KT* row, int64_t d, bool l2) {
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < d; c += 32) {
    const float kv = to_float(row[c]);
    acc += l2 ? (q[c] - kv) * (q[c] - kv) : q[c] * kv;
  }
  acc = warp_sum(acc);
  return l2 ? -acc : acc;
}

// Dot product of a float row with a row of T, by one warp.
template <typename T>
__device__ inline float warp_dot(const float* a, const T* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < n; c += 32) acc += a[c] * to_float(b[c]);
  return warp_sum(acc);
}

// Whether query b lists `id` among its excluded ids (binary search of its sorted row).
__device__ inline bool excluded(const Exclusions& ex, int64_t b, int64_t id) {
  if (ex.width == 0) return false;
  const int64_t* row = ex.sorted + b * ex.width;
  int64_t lo = 0, hi = ex.width;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return lo < ex.width && row[lo] == id;
}

__device__ __forceinline__ bool live(const int64_t* ids, const Exclusions& ex, int64_t b, int64_t row) {
  return ids[row] >= 0 && !excluded(ex, b, ids[row]);
}

// Lets `kernel` use `smem` bytes of dynamic shared memory on the current device, asking
// the driver once per (device, kernel) and larger size: cudaFuncSetAttribute had been
// called on every launch past the default 48 KB.
template <typename... Params>
cudaError_t opt_in(void (*kernel)(Params...), size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> granted;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{device, reinterpret_cast<const void*>(kernel)}];
  if (smem <= have) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) have = smem;
  return err;
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args... args) {
  // The default limit, 48 KB, holds static and dynamic shared memory together: a kernel
  // with any static shared memory can pass it with less than 48 KB of dynamic, so every
  // launch with dynamic shared memory opts in (once per size: see opt_in).
  if (smem > 0) {
    const cudaError_t err = opt_in(kernel, smem);
    if (err != cudaSuccess) return err;
  }
#ifdef KMEM_CUDA_SIM
  sim::launch(kernel, grid, block, smem, args...);
#else
  kernel<<<grid, block, smem, stream>>>(args...);
#endif
  return cudaGetLastError();
}

// An attribute of the current device; `fallback` if it cannot be read.
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess)
    return fallback;
  return value > 0 ? value : fallback;
}

// Above this many queries the search and dense attention score on tensor cores (sm_80
// and later): a staged key then serves enough queries for scoring, not reading the
// keys, to bound the kernel.
inline constexpr int64_t kTensorCoreBatch = 16;

// Whether a call over `batch` queries takes the tensor-core paths. KMEM_CUDA_TENSOR_CORES=0
// keeps every call on float32 FMA (read at each call): the benchmarks' lever for timing
// both paths in one run, and the tests' way to compare them.
inline bool tensor_cores(int64_t batch) {
  if (batch <= kTensorCoreBatch) return false;  // small calls, the latency-bound ones, ask nothing more
  const char* lever = std::getenv("KMEM_CUDA_TENSOR_CORES");
  if (lever != nullptr && std::strcmp(lever, "0") == 0) return false;
  return device_attribute(cudaDevAttrComputeCapabilityMajor, 0) >= 8;
}

inline unsigned grid_size(int64_t blocks, int64_t cap) { return static_cast<unsigned>(blocks < cap ? blocks : cap); }

constexpr int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>) with T the C++ type of dtype.
template <typename F>
cudaError_t with_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f16: return f(Tag<__half>{});
    case Dtype::bf16: return f(Tag<__nv_bfloat16>{});
    default: return f(Tag<float>{});
  }
}

// Calls f(Tag<KT>, Tag<VT>) for the rows' key and value types (VT = float for labels,
// whose values pointer is unused: no need to instantiate it three times).
template <typename F>
cudaError_t with_row_types(const Rows& r, F&& f) {
  return with_type(r.key_dtype, [&](auto kt) {
    if (r.labels) return f(kt, Tag<float>{});
    return with_type(r.value_dtype, [&](auto vt) { return f(kt, vt); });
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace kmem
