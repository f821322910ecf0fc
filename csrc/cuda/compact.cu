// Stable compaction on the GPU: a device-wide scan of the keep flags (CUB), then one
// thread per word of every kept row copies it to its scanned position.
#include <cub/device/device_scan.cuh>

#include "compact.cuh"
#include "kernel_common.cuh"

namespace kmem {
namespace cuda {
using namespace detail;
namespace {

__global__ void flags_kernel(const bool* keep, int64_t rows, int64_t* flags) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < rows) flags[i] = keep[i] ? 1 : 0;
}

template <typename Word>
__global__ void copy_kernel(const Word* src, const bool* keep, const int64_t* positions, int64_t rows,
                            int64_t words, Word* out) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= rows * words) return;
  const int64_t row = t / words, w = t - row * words;
  if (keep[row]) out[(positions[row] - 1) * words + w] = src[t];
}

template <typename Word>
cudaError_t launch_copy(const void* src, const bool* keep, const int64_t* positions, int64_t rows,
                        int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total = rows * words;
  return launch(copy_kernel<Word>, dim3(static_cast<unsigned>(div_up(total, kThreads))), dim3(kThreads), 0, stream,
                static_cast<const Word*>(src), keep, positions, rows, words, static_cast<Word*>(out));
}

bool fits(int64_t row_bytes, const void* a, const void* b, size_t word) {
  return row_bytes % static_cast<int64_t>(word) == 0 && reinterpret_cast<uintptr_t>(a) % word == 0 &&
         reinterpret_cast<uintptr_t>(b) % word == 0;
}

}  // namespace

size_t compact_workspace_bytes(int64_t rows) {
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                rows);
  return bytes;
}

cudaError_t compact_scan(const bool* keep, int64_t rows, int64_t* positions, void* workspace,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = launch(flags_kernel, dim3(static_cast<unsigned>(div_up(rows, kThreads))), dim3(kThreads), 0,
                           stream, keep, rows, positions);
  if (err != cudaSuccess) return err;
  size_t bytes = compact_workspace_bytes(rows);
  // In place: CUB's scans allow d_in == d_out.
  return cub::DeviceScan::InclusiveSum(workspace, bytes, positions, positions, rows, stream);
}

cudaError_t compact_copy(const void* src, const bool* keep, const int64_t* positions, int64_t rows,
                         int64_t row_bytes, void* out, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  if (fits(row_bytes, src, out, 16)) return launch_copy<int4>(src, keep, positions, rows, row_bytes, out, stream);
  if (fits(row_bytes, src, out, 8)) return launch_copy<int64_t>(src, keep, positions, rows, row_bytes, out, stream);
  if (fits(row_bytes, src, out, 4)) return launch_copy<int32_t>(src, keep, positions, rows, row_bytes, out, stream);
  if (fits(row_bytes, src, out, 2)) return launch_copy<int16_t>(src, keep, positions, rows, row_bytes, out, stream);
  return launch_copy<int8_t>(src, keep, positions, rows, row_bytes, out, stream);
}

}  // namespace cuda
}  // namespace kmem
