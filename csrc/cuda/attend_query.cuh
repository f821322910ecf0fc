// One query's softmax attention over the rows a search chose, by one block of kThreads:
// the attend kernel runs it per query, and so does the last step of the one-pass top-k
// attention (search.cu), which therefore gives the same bits as search then attend.
#pragma once

#include "kernel_common.cuh"

namespace kmem {
namespace cuda {
namespace detail {

__device__ __forceinline__ bool valid_slot(int64_t s, int64_t n) { return s >= 0 && s < n; }

// wb [k] = softmax over the valid slots of scale * score (zeros when none), ob [W] =
// sum_j wb_j v_j, or the weight on each class for labels (zeros when no slot is valid;
// labels outside [0, W) add to no class).
// sb [k] are the query's slots (-1 or out of range: no row); `red` holds 32 floats.
template <typename KT, typename VT>
__device__ void attend_query(const float* qb, const KT* keys, const VT* values, const int64_t* labels,
                             const int64_t* sb, int64_t N, int64_t d, int64_t k, int64_t W, float scale, bool l2,
                             float* ob, float* wb, float* red) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  for (int64_t j = warp; j < k; j += kWarps) {
    const bool ok = valid_slot(sb[j], N);
    const float z = ok ? scale * warp_row_score(qb, keys + sb[j] * d, d, l2) : kNegInf;
    if (lane == 0) wb[j] = z;
  }
  __syncthreads();
  float m = kNegInf;
  for (int64_t j = t; j < k; j += kThreads) m = fmaxf(m, wb[j]);
  m = block_reduce(m, true, red);
  if (m == kNegInf) {  // no valid slot: zero weights, zero output
    for (int64_t j = t; j < k; j += kThreads) wb[j] = 0.0f;
    for (int64_t c = t; c < W; c += kThreads) ob[c] = 0.0f;
    return;
  }
  float total = 0.0f;
  for (int64_t j = t; j < k; j += kThreads) {
    const float e = valid_slot(sb[j], N) ? expf(wb[j] - m) : 0.0f;
    wb[j] = e;
    total += e;
  }
  const float inv = 1.0f / block_reduce(total, false, red);
  for (int64_t j = t; j < k; j += kThreads) wb[j] *= inv;
  __syncthreads();
  // A thread per column sums the slots in order: for labels, the weights of the slots of
  // its class (no atomics, so every run gives the same bits).
  for (int64_t c = t; c < W; c += kThreads) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      if (!valid_slot(sb[j], N)) continue;
      if (labels) acc += labels[sb[j]] == c ? wb[j] : 0.0f;
      else acc += wb[j] * to_float(values[sb[j] * W + c]);
    }
    ob[c] = acc;
  }
  __syncthreads();  // the caller may reuse wb, ob and red at once
}

}  // namespace detail
}  // namespace cuda
}  // namespace kmem
