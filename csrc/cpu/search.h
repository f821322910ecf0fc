#pragma once
#include <ATen/ATen.h>

namespace kmem {

// Batches up to this size stream over the keys once with SIMD dot products; larger
// ones score key tiles with a GEMM.
constexpr int64_t kStreamMaxBatch = 8;

// Slots [B, k] (int64, best first, -1 past the qualifying rows) of the top-k live rows
// per query: score q.k (or 2 q.k - |k|^2, the l2 ranking) in float32, rows with
// slot_ids == -1 skipped, ids in the query's exclude_ids row skipped, ties to the lower
// slot. queries [B, d] float; keys [N, d] float32/bfloat16/float16.
at::Tensor search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids, int64_t k,
                  bool l2, const c10::optional<at::Tensor>& exclude_ids);

}  // namespace kmem
