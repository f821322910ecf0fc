// The CUDA runtime as kmem's kernels use it, on the CPU: this directory comes first on
// the include path of the simulator's test module (csrc/cuda/sim/module.cpp), so the
// unchanged .cu sources compile with g++ and run on runtime.h's scheduler. It covers
// what csrc/cuda uses and no more; a kernel that needs another intrinsic adds it here.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time, so a static is the block's own
#define __align__(n) alignas(n)

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }

template <typename To, typename From>
inline To sim_bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
inline int __float_as_int(float f) { return sim_bits<int>(f); }
inline float __int_as_float(int i) { return sim_bits<float>(i); }
inline unsigned __float_as_uint(float f) { return sim_bits<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return sim_bits<float>(u); }

// ------------------------------------------------------------- barriers, warps
// The warp operations are not inlined, so their return address names the place in the
// kernel that calls them: the lanes of a warp must meet at one place (see runtime.h).
#define KMEM_SIM_CALLER __builtin_return_address(0)

inline void __syncthreads() { kmem::sim::sync_block(); }

// Shuffles exchange within the whole warp (kmem passes the full mask); a source lane
// outside [0, 32) or the segment of `width` returns the caller's own value, as CUDA's do.
template <typename T>
inline T sim_shuffle(T v, int src, int width, const void* site) {
  const int lane = kmem::sim::lane_id(), base = lane / width * width;
  const uint64_t* slots = kmem::sim::exchange(v, site);
  return src >= base && src < base + width ? kmem::sim::lane_value<T>(slots, src) : v;
}
template <typename T>
[[gnu::noinline]] T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return sim_shuffle(v, kmem::sim::lane_id() / width * width + src % width, width, KMEM_SIM_CALLER);
}
template <typename T>
[[gnu::noinline]] T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  return sim_shuffle(v, kmem::sim::lane_id() ^ lane_mask, width, KMEM_SIM_CALLER);
}
template <typename T>
[[gnu::noinline]] T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return sim_shuffle(v, kmem::sim::lane_id() - static_cast<int>(delta), width, KMEM_SIM_CALLER);
}
template <typename T>
[[gnu::noinline]] T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  return sim_shuffle(v, kmem::sim::lane_id() + static_cast<int>(delta), width, KMEM_SIM_CALLER);
}
[[gnu::noinline]] inline unsigned __ballot_sync(unsigned, int predicate) {
  const uint64_t* slots = kmem::sim::exchange(predicate != 0 ? 1 : 0, KMEM_SIM_CALLER);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= (slots[lane] != 0 ? 1u : 0u) << lane;
  return bits;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += a b, by the whole warp: each
// lane holds the fragments of the PTX ISA's layout (g = lane / 4, c = lane % 4): a =
// A[g][c], A[g+8][c], A[g][c+4], A[g+8][c+4] of A [16, 8]; b = B[c][g], B[c+4][g] of
// B [8, 8]; d = D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1] of D [16, 8]. The
// operands lose the low 13 bits of their mantissas, as the tensor cores read them; the
// products (exact in float32) add to d in k order.
[[gnu::noinline]] inline void sim_mma_m16n8k8_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  struct Pair {
    float x, y;
  };
  const void* site = KMEM_SIM_CALLER;
  float A[16][8], B[8][8];
  auto gather = [&](float x, float y, auto put) {
    const uint64_t* slots = kmem::sim::exchange(Pair{x, y}, site);
    for (int lane = 0; lane < 32; ++lane) {
      const Pair p = kmem::sim::lane_value<Pair>(slots, lane);
      put(lane / 4, lane % 4, p.x, p.y);
    }
  };
  gather(a[0], a[1], [&](int g, int c, float x, float y) { A[g][c] = x, A[g + 8][c] = y; });
  gather(a[2], a[3], [&](int g, int c, float x, float y) { A[g][c + 4] = x, A[g + 8][c + 4] = y; });
  gather(b[0], b[1], [&](int g, int c, float x, float y) { B[c][g] = x, B[c + 4][g] = y; });
  auto tf32 = [](float x) { return sim_bits<float>(sim_bits<uint32_t>(x) & 0xFFFFE000u); };
  const int g = kmem::sim::lane_id() / 4, c = kmem::sim::lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * c + (i & 1);
    for (int k = 0; k < 8; ++k) d[i] += tf32(A[row][k]) * tf32(B[k][col]);
  }
}

// ------------------------------------------------------------------- atomics
// One OS thread runs every fiber, and a fiber is never interrupted between barriers:
// a plain read-modify-write is atomic here.
template <typename T, typename U>
inline T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}
template <typename T, typename U>
inline T atomicMax(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}

// ------------------------------------------------------------------- runtime
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };

inline std::string& sim_error_text() {
  static std::string text;
  return text;
}
inline cudaError_t& sim_last_error() {
  static cudaError_t err = cudaSuccess;
  return err;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t err = sim_last_error();
  sim_last_error() = cudaSuccess;
  return err;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : sim_error_text().c_str();
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// Two multiprocessors: work sized by the SM count spreads over few blocks, so every block
// loops over several rows' worth of work, as on a large input on a GPU. Compute
// capability 9 (sm_90), so the kernels take their tensor-core paths.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 2 : 9;
  return cudaSuccess;
}
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kmem::sim::kMaxSmem) {
    sim_error_text() = "cudaFuncSetAttribute: " + std::to_string(bytes) + " bytes of shared memory (at most " +
                       std::to_string(kmem::sim::kMaxSmem) + ")";
    return cudaErrorInvalidValue;
  }
  kmem::sim::grant(reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

namespace kmem {
namespace sim {

// kernel<<<grid, block, smem, stream>>>(args...), simulated: a failure is kept for
// cudaGetLastError as a GPU launch error is.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  const std::string failure =
      run(reinterpret_cast<const void*>(kernel), grid, block, smem, [=] { kernel(args...); });
  if (failure.empty()) return;
  sim_error_text() = "simulated kernel: " + failure;
  sim_last_error() = cudaErrorLaunchFailure;
}

}  // namespace sim
}  // namespace kmem
