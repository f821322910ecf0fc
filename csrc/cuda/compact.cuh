#pragma once
// Host launcher of kmem's CUDA stable compaction. CUDA headers only (see
// topk_attention.cuh for why); the torch glue is in bindings.cpp.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kmem {
namespace cuda {

// Bytes of scratch `compact_scan` needs for `rows` rows.
size_t compact_workspace_bytes(int64_t rows);

// First half of a stable compaction: `positions` [rows] int64 receives the inclusive
// prefix sum of `keep` [rows], so kept row i goes to output row positions[i] - 1 and
// positions[rows - 1] is the number kept. The caller reads that count (to size-check
// the output) before `compact_copy`.
cudaError_t compact_scan(const bool* keep, int64_t rows, int64_t* positions, void* workspace,
                         cudaStream_t stream);

// One buffer to compact: `src` rows x row_bytes (raw bytes) into `out`.
struct CopyBuffer {
  const void* src;
  void* out;
  int64_t row_bytes;
};

inline constexpr int kMaxCopyBuffers = 4;  // buffers one launch moves

// Second half: copies every kept row of each of `count` (1..kMaxCopyBuffers) buffers to
// its place in their `out`, in one launch. Rows move as the widest words (16, 8, 4, 2 or
// 1 bytes) that every buffer's row size and pointers' alignment allow, so one kernel
// serves every dtype.
cudaError_t compact_copy(const CopyBuffer* buffers, int count, const bool* keep, const int64_t* positions,
                         int64_t rows, cudaStream_t stream);

}  // namespace cuda
}  // namespace kmem
