#pragma once
#include <ATen/ATen.h>

namespace kmem {

// How a batch is scored (measured at 1.28M x 256 on a 2-core AVX-512 machine): up to
// kStreamMaxBatch queries stream over the keys once with SIMD dot products (bfloat16
// keys, d a multiple of 32: AMX tiles where the CPU has them), reading each key row once
// for all of them; larger batches score key tiles with BLAS, bfloat16 keys (even d) by
// the AVX512-BF16 tile kernel (queries rounded to bf16).
constexpr int64_t kStreamMaxBatch = 64;

// The top-k live rows per query: (scores [B, k] float32, slots [B, k] int64), best
// first, -inf and -1 past the qualifying rows. Each score is the one the row was ranked
// by: q.k, or 2 q.k - |k|^2 for l2 (-||q - k||^2 + |q|^2), in float32. Rows with
// slot_ids == -1 are skipped, and ids in the query's exclude_ids row; ties go to the
// lower slot. queries [B, d] float; keys [N, d] float32/bfloat16/float16.
std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids, int64_t k,
                  bool l2, const c10::optional<at::Tensor>& exclude_ids);

}  // namespace kmem
