// Kernels that test the simulator itself (tests/test_cuda_sim.py): its warp exchanges
// against their CUDA definitions, and the faults it must report rather than run.
#pragma once

#include <torch/extension.h>

#include <string>

#include "cuda_runtime.h"

namespace kmem {
namespace sim {
namespace selftest {

// out[t] = shuffles of each lane's id: xor 5, up 3, down 7, broadcast of lane 9, and
// the ballot of odd lanes; then the block's barrier-ordered sum of ids.
__global__ void shuffles_kernel(int* out) {
  __shared__ int total;
  const int t = threadIdx.x;
  if (t == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, t);
  out[6 * t + 0] = __shfl_xor_sync(0xFFFFFFFFu, t, 5);
  out[6 * t + 1] = __shfl_up_sync(0xFFFFFFFFu, t, 3);
  out[6 * t + 2] = __shfl_down_sync(0xFFFFFFFFu, t, 7);
  out[6 * t + 3] = __shfl_sync(0xFFFFFFFFu, t, 9);
  out[6 * t + 4] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, t % 2));
  __syncthreads();
  out[6 * t + 5] = total;
}

// Lanes past 20 return before the shuffle the rest wait at: undefined on a GPU.
__global__ void diverged_kernel(int* out) {
  if (threadIdx.x % 32 > 20) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

// Half of a warp at __syncthreads, the other half at a shuffle: a deadlock on a GPU.
__global__ void split_kernel(int* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1, 1);
  }
}

// Odd and even lanes at two different shuffles: undefined on a GPU.
__global__ void two_places_kernel(int* out) {
  const int t = threadIdx.x;
  if (t % 2) out[t] = __shfl_xor_sync(0xFFFFFFFFu, t, 1);
  else out[t] = __shfl_xor_sync(0xFFFFFFFFu, t, 2);
}

// out [16, 8] = a [16, 8] b [8, 8] by one m16n8k8 TF32 MMA, each lane loading and
// storing its fragments by the layout kernel_common.cuh's mma_tf32 documents.
__global__ void mma_kernel(float* out) {
  const float* a = out + 128;
  const float* b = out + 256;
  const int g = threadIdx.x / 4, c = threadIdx.x % 4;
  const float fa[4] = {a[g * 8 + c], a[(g + 8) * 8 + c], a[g * 8 + c + 4], a[(g + 8) * 8 + c + 4]};
  const float fb[2] = {b[c * 8 + g], b[(c + 4) * 8 + g]};
  float d[4] = {};
  kmem::cuda::detail::mma_tf32(d, fa, fb);
  __syncthreads();  // every lane has read a and b before out is written
  out[g * 8 + 2 * c] = d[0];
  out[g * 8 + 2 * c + 1] = d[1];
  out[(g + 8) * 8 + 2 * c] = d[2];
  out[(g + 8) * 8 + 2 * c + 1] = d[3];
}

__global__ void smem_kernel(float* out) { out[threadIdx.x] = kmem::cuda::detail::dynamic_smem<float>()[0]; }

// Launches `name` on one block of `threads`, with `smem` bytes of dynamic shared
// memory; returns the simulator's error text ("" when it ran).
inline std::string launch_checked(const std::string& name, int64_t threads, int64_t smem, at::Tensor out) {
  const dim3 grid(1), block(static_cast<unsigned>(threads));
  if (name == "shuffles") launch(shuffles_kernel, grid, block, smem, out.data_ptr<int>());
  else if (name == "diverged") launch(diverged_kernel, grid, block, smem, out.data_ptr<int>());
  else if (name == "split") launch(split_kernel, grid, block, smem, out.data_ptr<int>());
  else if (name == "two places") launch(two_places_kernel, grid, block, smem, out.data_ptr<int>());
  else if (name == "smem") launch(smem_kernel, grid, block, smem, out.data_ptr<float>());
  else if (name == "mma") launch(mma_kernel, grid, block, smem, out.data_ptr<float>());
  else TORCH_CHECK(false, "no self-test kernel ", name);
  return cudaGetLastError() == cudaSuccess ? std::string() : std::string(cudaGetErrorString(cudaErrorLaunchFailure));
}

}  // namespace selftest
}  // namespace sim
}  // namespace kmem
