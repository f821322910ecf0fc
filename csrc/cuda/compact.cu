// Stable compaction on the GPU: a device-wide scan of the keep flags (CUB), then one
// launch in which a thread per word of every buffer's rows copies a kept row's word to
// its scanned position.
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

// Every buffer's rows in one launch: thread t copies word t of the buffers laid end to
// end (buffer j's words end at ends[j]).
struct CopyPlan {
  const void* src[kMaxCopyBuffers];
  void* out[kMaxCopyBuffers];
  int64_t words[kMaxCopyBuffers];  // per row
  int64_t ends[kMaxCopyBuffers];
  int count;
};

template <typename Word>
__global__ void copy_kernel(CopyPlan plan, const bool* keep, const int64_t* positions) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= plan.ends[plan.count - 1]) return;
  int j = 0;
  while (t >= plan.ends[j]) ++j;
  const int64_t local = t - (j > 0 ? plan.ends[j - 1] : 0), words = plan.words[j];
  const int64_t row = local / words, w = local - row * words;
  if (keep[row])
    static_cast<Word*>(plan.out[j])[(positions[row] - 1) * words + w] = static_cast<const Word*>(plan.src[j])[local];
}

// Whether every buffer's rows and pointers allow words of `word` bytes.
bool fits(const CopyBuffer* buffers, int count, size_t word) {
  for (int j = 0; j < count; ++j) {
    const CopyBuffer& b = buffers[j];
    if (b.row_bytes % static_cast<int64_t>(word) != 0 || reinterpret_cast<uintptr_t>(b.src) % word != 0 ||
        reinterpret_cast<uintptr_t>(b.out) % word != 0)
      return false;
  }
  return true;
}

template <typename Word>
cudaError_t launch_copy(const CopyBuffer* buffers, int count, const bool* keep, const int64_t* positions,
                        int64_t rows, cudaStream_t stream) {
  CopyPlan plan{};
  int64_t total = 0;
  for (int j = 0; j < count; ++j) {
    plan.src[plan.count] = buffers[j].src;
    plan.out[plan.count] = buffers[j].out;
    plan.words[plan.count] = buffers[j].row_bytes / static_cast<int64_t>(sizeof(Word));
    if (plan.words[plan.count] == 0) continue;  // rows of zero bytes: nothing to move
    total += rows * plan.words[plan.count];
    plan.ends[plan.count++] = total;
  }
  if (total == 0) return cudaSuccess;
  return launch(copy_kernel<Word>, dim3(static_cast<unsigned>(div_up(total, kThreads))), dim3(kThreads), 0, stream,
                plan, keep, positions);
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

cudaError_t compact_copy(const CopyBuffer* buffers, int count, const bool* keep, const int64_t* positions,
                         int64_t rows, cudaStream_t stream) {
  if (count < 1 || count > kMaxCopyBuffers) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // The widest word every buffer allows: with int64 ids among them, keys move in 8 bytes.
  if (fits(buffers, count, 16)) return launch_copy<int4>(buffers, count, keep, positions, rows, stream);
  if (fits(buffers, count, 8)) return launch_copy<int64_t>(buffers, count, keep, positions, rows, stream);
  if (fits(buffers, count, 4)) return launch_copy<int32_t>(buffers, count, keep, positions, rows, stream);
  if (fits(buffers, count, 2)) return launch_copy<int16_t>(buffers, count, keep, positions, rows, stream);
  return launch_copy<int8_t>(buffers, count, keep, positions, rows, stream);
}

}  // namespace cuda
}  // namespace kmem
