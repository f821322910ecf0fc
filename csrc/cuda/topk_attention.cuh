#pragma once
// Host launchers of kmem's CUDA kernels: fused top-k search, attention over the chosen
// rows, and dense (all-rows) attention, forward and backward.
//
// Only CUDA headers are included here and in the .cu: the CPU build of torch ships
// incomplete CUDA headers, so all torch glue lives in bindings.cpp, which hands these
// launchers raw device pointers, sizes and a stream. Every launcher is asynchronous on
// `stream` and returns the first CUDA error it met (cudaSuccess otherwise).
//
// Conventions (see kmem/ops/reference.py): score = q . k (ip) or -||q - k||^2 (l2),
// computed in float32 whatever the storage dtype; slot_ids[j] == -1 marks a dead row;
// an excluded id is skipped for the query that lists it.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kmem {
namespace cuda {

// Storage dtype of keys or of vector values.
enum class Dtype { f32, f16, bf16 };

// Ids each query skips: `sorted` is [batch, width] int64, every row ascending (padding
// -1 never matches a live id); null with width 0 when nothing is excluded.
struct Exclusions {
  const int64_t* sorted;
  int64_t width;
};

// The memory rows: keys [n, d], and either vector values [n, width] or int64 labels [n]
// (then `labels` is set, `values` is unused and width is the number of classes).
struct Rows {
  const void* keys;
  Dtype key_dtype;
  const void* values;
  Dtype value_dtype;
  const int64_t* labels;
  int64_t n, d, width;
};

// ------------------------------------------------------------------- search
struct SearchArgs {
  const float* queries;  // [batch, d]
  int64_t batch;
  const void* keys;  // [n, d], n < 2^32 - 1 (a slot must fit the packed key's low word)
  Dtype key_dtype;
  int64_t n, d;
  const int64_t* slot_ids;  // [n]
  Exclusions exclude;
  int64_t k;  // >= 1
  bool l2;
};

// Bytes of scratch `search` needs (bounded, independent of n beyond one chunk).
size_t search_workspace_bytes(int64_t batch, int64_t n, int64_t k);

// scores and slots [batch, k] (float32, int64): the top-k live, non-excluded rows per
// query, best first by (float32 score desc, slot asc), -inf and -1 past the qualifying
// rows. Each score is the one the row was ranked by; the l2 ranking drops the per-query
// constant: 2 q.k - |k|^2.
cudaError_t search(const SearchArgs& a, float* scores, int64_t* slots, void* workspace, cudaStream_t stream);

// Top-k attention in one pass: the search above, then for each query the softmax weights
// [batch, k] and output [batch, width] over the rows found -- slots [batch, k] --
// exactly as attend_forward computes them, in the search's last kernel. `workspace`:
// search_workspace_bytes.
cudaError_t topk_forward(const SearchArgs& a, const Rows& rows, float scale, float* out, int64_t* slots,
                         float* weights, void* workspace, cudaStream_t stream);

// ------------------------------------------------------ attention over slots
struct AttendArgs {
  const float* queries;  // [batch, d]
  int64_t batch;
  Rows rows;
  const int64_t* slots;  // [batch, k]; -1 (or out of range) = no row
  int64_t k;
  float scale;
  bool l2;
};

// out [batch, width] = sum_j w_j v_j (or class probabilities), weights [batch, k] =
// softmax over the valid slots of scale * score; a query without a valid slot gets
// zero weights and a zero output.
cudaError_t attend_forward(const AttendArgs& a, float* out, float* weights, cudaStream_t stream);

// Gradients of attend_forward given grad_out [batch, width] and its weights: dq
// [batch, d], and each retrieval's share of its row's gradient, key_grads [batch k, d]
// and value_grads [batch k, width] (each may be null; vector values only; zero where the
// slot is not valid), for scatter_rows to sum per row. `ds` is [batch, k] float scratch.
cudaError_t attend_backward(const AttendArgs& a, const float* grad_out, const float* weights, float* ds, float* dq,
                            float* key_grads, float* value_grads, cudaStream_t stream);

// out [n, width] = for each row s, the sum of rows[i] [m, width] over the i with
// slots[i] == s, in the order `order` lists them (a stable sort of slots [m]), zero for
// rows no slot names: the same sums in the same order on every run, where atomic adds
// would follow the blocks' timing. Slots outside [0, n) are skipped.
cudaError_t scatter_rows(const float* rows, const int64_t* slots, const int64_t* order, int64_t m, int64_t width,
                         int64_t n, float* out, cudaStream_t stream);

// ------------------------------------------------------ attention over all rows
struct DenseArgs {
  const float* queries;  // [batch, d]
  int64_t batch;
  Rows rows;
  const int64_t* slot_ids;  // [n]
  Exclusions exclude;
  float scale;
  bool l2;
};

size_t dense_forward_workspace_bytes(int64_t batch, int64_t n, int64_t width);

// out [batch, width] and lse [batch] = log-sum-exp of scale * score over the live,
// non-excluded rows (-inf and a zero output for a query with none).
cudaError_t dense_forward(const DenseArgs& a, float* out, float* lse, void* workspace, cudaStream_t stream);

size_t dense_backward_workspace_bytes(int64_t batch, int64_t n, int64_t d);

// Gradients of dense_forward from grad_out [batch, width] and grad_lse [batch] (what
// reaches lse), its out and lse, recomputing the weights: dq [batch, d]; dkeys [n, d]
// and dvalues [n, width] may be null.
cudaError_t dense_backward(const DenseArgs& a, const float* grad_out, const float* grad_lse, const float* out,
                           const float* lse, float* dq, float* dkeys, float* dvalues, void* workspace,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace kmem
