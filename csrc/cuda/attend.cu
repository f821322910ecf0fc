// CUDA attention over the rows a search chose: one block per query, a warp scores a
// row, the block takes the softmax; the backward writes each retrieval's share of its
// row's gradient, and scatter_rows sums the shares of rows that queries share, in a
// fixed order (no atomics: the same bits on every run).
#include "attend_query.cuh"

namespace kmem {
namespace cuda {
using namespace detail;
namespace {

// ---------------------------------------------------- attention over slots
template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    attend_forward_kernel(const float* q, const KT* keys, const VT* values, const int64_t* labels,
                          const int64_t* slots, int64_t B, int64_t N, int64_t d, int64_t k, int64_t W, float scale,
                          bool l2, float* out, float* w) {
  __shared__ float red[32];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x)
    attend_query(q + b * d, keys, values, labels, slots + b * k, N, d, k, W, scale, l2, out + b * W, w + b * k, red);
}

// dz_j = w_j (dw_j - sum_i w_i dw_i), ds_j = scale * dz_j with dw_j = g . v_j (or
// g[label_j]); dq = sum_j ds_j k_j (ip) or -2 sum_j ds_j (q - k_j) (l2); retrieval j's
// shares: key_grads[b k + j] = ds_j q (ip) or 2 ds_j (q - k_j) (l2), value_grads = w_j g.
template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    attend_backward_kernel(const float* g, const float* q, const KT* keys, const VT* values, const int64_t* labels,
                           const int64_t* slots, const float* w, int64_t B, int64_t N, int64_t d, int64_t k,
                           int64_t W, float scale, bool l2, float* ds, float* dq, float* key_grads,
                           float* value_grads) {
  __shared__ float red[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float *gb = g + b * W, *qb = q + b * d, *wb = w + b * k;
    const int64_t* sb = slots + b * k;
    float* dsb = ds + b * k;
    for (int64_t j = warp; j < k; j += kWarps) {
      const int64_t s = sb[j];
      float dw = 0.0f;
      if (valid_slot(s, N)) {
        if (labels) dw = labels[s] >= 0 && labels[s] < W ? gb[labels[s]] : 0.0f;
        else dw = warp_dot(gb, values + s * W, W);
      }
      if (lane == 0) dsb[j] = dw;
    }
    __syncthreads();
    float mean = 0.0f;
    for (int64_t j = t; j < k; j += kThreads) mean += wb[j] * dsb[j];
    mean = block_reduce(mean, false, red);
    float total = 0.0f;
    for (int64_t j = t; j < k; j += kThreads) {
      dsb[j] = valid_slot(sb[j], N) ? scale * wb[j] * (dsb[j] - mean) : 0.0f;
      total += dsb[j];
    }
    total = block_reduce(total, false, red);  // its barrier also publishes dsb
    for (int64_t c = t; c < d; c += kThreads) {
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j)
        if (dsb[j] != 0.0f) acc += dsb[j] * to_float(keys[sb[j] * d + c]);
      dq[b * d + c] = l2 ? 2.0f * (acc - total * qb[c]) : acc;
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = sb[j];
      const bool valid = valid_slot(s, N);
      const float dsv = valid ? dsb[j] : 0.0f, wv = valid ? wb[j] : 0.0f;
      if (key_grads) {
        float* out = key_grads + (b * k + j) * d;
        for (int64_t c = t; c < d; c += kThreads)
          out[c] = l2 && dsv != 0.0f ? 2.0f * dsv * (qb[c] - to_float(keys[s * d + c])) : dsv * qb[c];
      }
      if (value_grads) {
        float* out = value_grads + (b * k + j) * W;
        for (int64_t c = t; c < W; c += kThreads) out[c] = wv * gb[c];
      }
    }
  }
}

// Block per position p of `order`: the first position of each run of equal slots sums
// the run's rows, in order, into out[slot] (whose other rows stay as they are: zero).
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const float* rows, const int64_t* slots, const int64_t* order, int64_t m, int64_t width,
                        int64_t n, float* out) {
  for (int64_t p = blockIdx.x; p < m; p += gridDim.x) {
    const int64_t s = slots[order[p]];
    if (s < 0 || s >= n || (p > 0 && slots[order[p - 1]] == s)) continue;  // the same for the whole block
    int64_t end = p + 1;
    while (end < m && slots[order[end]] == s) ++end;
    for (int64_t c = threadIdx.x; c < width; c += kThreads) {
      float acc = 0.0f;
      for (int64_t i = p; i < end; ++i) acc += rows[order[i] * width + c];
      out[s * width + c] = acc;
    }
  }
}

}  // namespace

cudaError_t attend_forward(const AttendArgs& a, float* out, float* weights, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const Rows& r = a.rows;
  return with_row_types(r, [&](auto kt, auto vt) {
    using KT = typename decltype(kt)::type;
    using VT = typename decltype(vt)::type;
    return launch(attend_forward_kernel<KT, VT>, dim3(grid_size(a.batch, 65535)), dim3(kThreads), 0, stream,
                  a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels, a.slots,
                  a.batch, r.n, r.d, a.k, r.width, a.scale, a.l2, out, weights);
  });
}

cudaError_t attend_backward(const AttendArgs& a, const float* grad_out, const float* weights, float* ds, float* dq,
                            float* key_grads, float* value_grads, cudaStream_t stream) {
  const Rows& r = a.rows;
  if (a.batch == 0) return cudaSuccess;
  return with_row_types(r, [&](auto kt, auto vt) {
    using KT = typename decltype(kt)::type;
    using VT = typename decltype(vt)::type;
    return launch(attend_backward_kernel<KT, VT>, dim3(grid_size(a.batch, 65535)), dim3(kThreads), 0, stream,
                  grad_out, a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels,
                  a.slots, weights, a.batch, r.n, r.d, a.k, r.width, a.scale, a.l2, ds, dq, key_grads, value_grads);
  });
}

cudaError_t scatter_rows(const float* rows, const int64_t* slots, const int64_t* order, int64_t m, int64_t width,
                         int64_t n, float* out, cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(n * width) * sizeof(float), stream);
  if (err != cudaSuccess || m == 0 || width == 0) return err;
  return launch(scatter_rows_kernel, dim3(grid_size(m, 65535)), dim3(kThreads), 0, stream, rows, slots, order, m,
                width, n, out);
}

}  // namespace cuda
}  // namespace kmem
