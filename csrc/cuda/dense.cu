// CUDA dense attention, flash-decoding: each block runs an online softmax over one split
// of the rows for a tile of queries, a combine kernel merges the splits by their
// log-sum-exp; the backward recomputes the weights from lse over bounded row chunks,
// each row tile adding its share of dq into its own partial (no atomics: deterministic).
#include "kernel_common.cuh"

namespace kmem {
namespace cuda {
using namespace detail;
namespace {

// ------------------------------------------------------ dense attention
constexpr int64_t kDenseTargetBlocks = 1024;  // splits x query tiles aimed for in the forward
constexpr int kRowsPerBlock = 32;  // rows per block of the dkeys / dvalues kernel: each re-reads q and g
constexpr int kRowThreads = 128;
constexpr int64_t kDenseChunkBudget = 1 << 22;  // weights kept per backward chunk, all queries

// The tiles of the forward and the backward: a block scores kDenseQueries queries against
// kDenseRows rows at a time, so every staged key serves all of them (one query per block
// had read the keys B times). Thread t holds a 4 x 4 register tile: queries 4 (t / 64) + j,
// rows t % 64 + 64 m.
constexpr int kDenseQueries = 16;
constexpr int kDenseRows = kThreads;
constexpr int kDenseCols = 16;  // key columns staged at a time
static_assert(kDenseQueries * kDenseRows == 16 * kThreads, "one 4 x 4 tile per thread");

struct DenseSmem {
  float keys[kDenseCols][kDenseRows + 1];  // transposed; +1: a row's columns land in distinct banks
  float queries[kDenseCols][kDenseQueries];
  float p[kDenseQueries][kDenseRows];  // logits, then their exponentials (the backward: dS)
  float m[kDenseQueries], l[kDenseQueries], alpha[kDenseQueries];
  float qnorm[kDenseQueries], knorm[kDenseRows];  // |q|^2 and |k|^2 of l2 on tensor cores
  int64_t labels[kDenseRows];
};

// acc[j][m] += score terms of the staged columns (q . k, or |q - k|^2 for l2).
template <bool L2>
__device__ __forceinline__ void tile_fma(const DenseSmem& sm, float (&acc)[4][4]) {
  const int qg = threadIdx.x / 64 * 4, rl = threadIdx.x % 64;
#pragma unroll 4
  for (int c = 0; c < kDenseCols; ++c) {
    float kv[4], qv[4];
    for (int m = 0; m < 4; ++m) kv[m] = sm.keys[c][rl + 64 * m];
    for (int j = 0; j < 4; ++j) qv[j] = sm.queries[c][qg + j];
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 4; ++m) {
        const float x = L2 ? qv[j] - kv[m] : qv[j] * kv[m];
        acc[j][m] += L2 ? x * x : x;
      }
  }
}

// Stages columns [c0, c0 + kDenseCols) of the nr rows (transposed, sm.keys) and of the na
// rows of `a` (sm.queries), 0 past either's end, between two barriers.
template <typename T>
__device__ __forceinline__ void stage_columns(const float* a, int na, const T* rows, int nr, int64_t width,
                                              int64_t c0, DenseSmem& sm) {
  const int t = threadIdx.x;
  __syncthreads();  // the last readers of the staged columns (or of sm.p) are done
  stage_tile<kDenseRows, kDenseCols>(rows, width, nr, c0, [&](int i, int c, float x) { sm.keys[c][i] = x; });
  for (int e = t; e < kDenseQueries * kDenseCols; e += kThreads) {
    const int j = e / kDenseCols, c = e % kDenseCols;
    sm.queries[c][j] = j < na && c0 + c < width ? a[j * width + c0 + c] : 0.0f;
  }
  __syncthreads();
}

// acc[j][m] = sum over c < width of a_j[c] rows_i[c] (or of (a_j[c] - rows_i[c])^2 for
// l2), i = t % 64 + 64 m, j = 4 (t / 64) + j: `a` holds na rows of queries (or
// gradients), `rows` nr key (or value) rows, both of `width` columns. Ends with the
// staged columns still in use: the caller's next write to sm needs a barrier.
template <typename T>
__device__ __forceinline__ void tile_scores(const float* a, int na, const T* rows, int nr, int64_t width, bool l2,
                                            DenseSmem& sm, float (&acc)[4][4]) {
  for (int j = 0; j < 4; ++j)
    for (int m = 0; m < 4; ++m) acc[j][m] = 0.0f;
  for (int64_t c0 = 0; c0 < width; c0 += kDenseCols) {
    stage_columns(a, na, rows, nr, width, c0, sm);
    if (l2) tile_fma<true>(sm, acc);
    else tile_fma<false>(sm, acc);
  }
}

// tile_scores on tensor cores (3xTF32, about float32's accuracy): warp w scores rows
// 32 w to 32 w + 31 against the 16 queries as four m16n8k8 tiles, acc[n][i] the score
// of query tile_query<true>(n, i) and row tile_row<true>(n, i). l2 expands |q - k|^2 as
// |q|^2 + |k|^2 - 2 q.k (the norms from the staged columns, in float32), as the
// Triton kernel does.
template <typename T>
__device__ __forceinline__ void tile_scores_mma(const float* a, int na, const T* rows, int nr, int64_t width,
                                                bool l2, DenseSmem& sm, float (&acc)[4][4]) {
  const int t = threadIdx.x, g = t % 32 / 4, c4 = t % 4, base = t / 32 * 32;
  float knorm = 0.0f, qnorm = 0.0f;
  for (int n = 0; n < 4; ++n)
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  for (int64_t c0 = 0; c0 < width; c0 += kDenseCols) {
    stage_columns(a, na, rows, nr, width, c0, sm);
    if (l2) {
      for (int c = 0; c < kDenseCols; ++c) knorm += sm.keys[c][t] * sm.keys[c][t];
      if (t < kDenseQueries)
        for (int c = 0; c < kDenseCols; ++c) qnorm += sm.queries[c][t] * sm.queries[c][t];
    }
#pragma unroll
    for (int k0 = 0; k0 < kDenseCols; k0 += 8) {
      const float fa[4] = {sm.queries[k0 + c4][g], sm.queries[k0 + c4][g + 8], sm.queries[k0 + c4 + 4][g],
                           sm.queries[k0 + c4 + 4][g + 8]};
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int row = base + 8 * n + g;
        const float fb[2] = {sm.keys[k0 + c4][row], sm.keys[k0 + c4 + 4][row]};
        mma_3xtf32(acc[n], fa, fb);
      }
    }
  }
  if (!l2) return;
  sm.knorm[t] = knorm;
  if (t < kDenseQueries) sm.qnorm[t] = qnorm;
  __syncthreads();
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      acc[n][i] = sm.qnorm[g + 8 * (i / 2)] + sm.knorm[base + 8 * n + 2 * c4 + i % 2] - 2.0f * acc[n][i];
}

// Where the register tile's entry acc[x][y] lies in the block's 16 x 256 tile: the
// query and row of FMA tiles (tile_scores: x a query, y a row) or of MMA fragments
// (tile_scores_mma: x a group of 8 rows, y a fragment element).
template <bool kMma>
__device__ __forceinline__ int tile_query(int x, int y) {
  return kMma ? threadIdx.x % 32 / 4 + 8 * (y / 2) : threadIdx.x / 64 * 4 + x;
}
template <bool kMma>
__device__ __forceinline__ int tile_row(int x, int y) {
  return kMma ? threadIdx.x / 32 * 32 + 8 * x + 2 * (threadIdx.x % 4) + y % 2 : threadIdx.x % 64 + 64 * y;
}

// acc_j = alpha_j acc_j + sum_i p[j][i] values[i] for the tile's nq queries on tensor cores
// (3xTF32): warp w takes the column groups w, w + 8, ... of 8 columns, each an m16n8k8
// product over the tile's rows (P as A, the value rows as B, read from global memory).
// acc rows are `stride` floats apart; each (query, column) belongs to one lane.
template <typename VT>
__device__ __forceinline__ void tile_values_mma(const VT* values, int n, int64_t W, int nq, const DenseSmem& sm,
                                                float* acc, int64_t stride) {
  const int t = threadIdx.x, g = t % 32 / 4, c4 = t % 4;
  for (int64_t n0 = t / 32 * 8; n0 < W; n0 += kWarps * 8) {
    float o[4] = {};
    const int64_t col = n0 + g;
    for (int k0 = 0; k0 < n; k0 += 8) {
      const float fa[4] = {sm.p[g][k0 + c4], sm.p[g + 8][k0 + c4], sm.p[g][k0 + c4 + 4], sm.p[g + 8][k0 + c4 + 4]};
      const int r0 = k0 + c4, r1 = r0 + 4;  // p is 0 past the tile's rows: their values read as 0
      const float fb[2] = {r0 < n && col < W ? to_float(values[r0 * W + col]) : 0.0f,
                           r1 < n && col < W ? to_float(values[r1 * W + col]) : 0.0f};
      mma_3xtf32(o, fa, fb);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = g + 8 * (i / 2);
      const int64_t c = n0 + 2 * c4 + i % 2;
      if (j < nq && c < W) acc[j * stride + c] = acc[j * stride + c] * sm.alpha[j] + o[i];
    }
  }
}

// Grid (query tiles, splits): an online softmax over one split of the rows for a tile
// of queries. Leaves each query's running max m, sum l and unnormalised acc [W]
// (relative to m) of the split. With kMma the scores and P V run on tensor cores
// (3xTF32); labels' one-hot P V stays a per-class sum.
template <typename KT, typename VT, bool kMma>
__global__ void __launch_bounds__(kThreads)
    dense_split_kernel(const float* q, const KT* keys, const VT* values, const int64_t* labels, const int64_t* ids,
                       Exclusions ex, int64_t B, int64_t N, int64_t d, int64_t W, float scale, bool l2,
                       int64_t rows_per_split, float* part_m, float* part_l, float* part_acc) {
  __shared__ DenseSmem sm;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t S = gridDim.y, s = blockIdx.y;
  const int64_t r0 = s * rows_per_split, r1 = r0 + rows_per_split < N ? r0 + rows_per_split : N;
  for (int64_t b0 = static_cast<int64_t>(blockIdx.x) * kDenseQueries; b0 < B;
       b0 += static_cast<int64_t>(gridDim.x) * kDenseQueries) {
    const int nq = B - b0 < kDenseQueries ? static_cast<int>(B - b0) : kDenseQueries;
    if (t < kDenseQueries) {
      sm.m[t] = kNegInf;
      sm.l[t] = 0.0f;
    }
    for (int64_t e = t; e < nq * W; e += kThreads) part_acc[((b0 + e / W) * S + s) * W + e % W] = 0.0f;
    for (int64_t r = r0; r < r1; r += kDenseRows) {
      const int n = r1 - r < kDenseRows ? static_cast<int>(r1 - r) : kDenseRows;
      float acc[4][4];
      if (kMma) tile_scores_mma(q + b0 * d, nq, keys + r * d, n, d, l2, sm, acc);
      else tile_scores(q + b0 * d, nq, keys + r * d, n, d, l2, sm, acc);
      __syncthreads();  // the last tile's reads of sm.p are done (tile_scores' barriers order them too, if d > 0)
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) {
          const int j = tile_query<kMma>(x, y), i = tile_row<kMma>(x, y);
          const bool ok = i < n && j < nq && live(ids, ex, b0 + j, r + i);
          sm.p[j][i] = ok ? scale * (l2 ? -acc[x][y] : acc[x][y]) : kNegInf;
        }
      if (labels)
        for (int i = t; i < n; i += kThreads) sm.labels[i] = labels[r + i];
      __syncthreads();
      for (int j = warp; j < kDenseQueries; j += kWarps) {  // a warp per query: max, exponentials, sum
        float mx = kNegInf;
        for (int i = lane; i < kDenseRows; i += 32) mx = fmaxf(mx, sm.p[j][i]);
        const float m_old = sm.m[j], m_new = fmaxf(m_old, warp_max(mx));
        float sum = 0.0f;
        for (int i = lane; i < kDenseRows; i += 32) {
          const float e = m_new == kNegInf ? 0.0f : expf(sm.p[j][i] - m_new);  // 0 for -inf
          sm.p[j][i] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
          const float alpha = m_new == kNegInf ? 1.0f : expf(m_old - m_new);
          sm.alpha[j] = alpha;
          sm.l[j] = sm.l[j] * alpha + sum;
          sm.m[j] = m_new;
        }
      }
      __syncthreads();
      if (kMma && !labels) {
        tile_values_mma(values + r * W, n, W, nq, sm, part_acc + (b0 * S + s) * W, S * W);
      } else {
        // Each thread owns columns c of every query of the tile: a value row is read once
        // for all of them, and no atomics are needed.
        for (int64_t c = t; c < W; c += kThreads) {
          float a[kDenseQueries];  // fixed-count loops over it keep it in registers
#pragma unroll
          for (int j = 0; j < kDenseQueries; ++j)
            a[j] = j < nq ? part_acc[((b0 + j) * S + s) * W + c] * sm.alpha[j] : 0.0f;
          for (int i = 0; i < n; ++i) {
            const float v = labels ? (sm.labels[i] == c ? 1.0f : 0.0f) : to_float(values[(r + i) * W + c]);
            if (v == 0.0f) continue;
#pragma unroll
            for (int j = 0; j < kDenseQueries; ++j) a[j] += sm.p[j][i] * v;
          }
#pragma unroll
          for (int j = 0; j < kDenseQueries; ++j)
            if (j < nq) part_acc[((b0 + j) * S + s) * W + c] = a[j];
        }
      }
    }
    __syncthreads();
    if (t < nq) {
      part_m[(b0 + t) * S + s] = sm.m[t];
      part_l[(b0 + t) * S + s] = sm.l[t];
    }
    __syncthreads();  // sm.m and sm.l are reset for the next tile of queries
  }
}

// Merges the S splits of each query by their maxima: out = sum_s e^(m_s - M) acc_s / L,
// lse = M + log L.
__global__ void __launch_bounds__(kThreads)
    dense_combine_kernel(const float* part_m, const float* part_l, const float* part_acc, int64_t B, int64_t S,
                         int64_t W, float* out, float* lse) {
  float* factor = dynamic_smem<float>();  // [S]
  __shared__ float red[32];
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    float m = kNegInf;
    for (int64_t s = t; s < S; s += kThreads) m = fmaxf(m, part_m[b * S + s]);
    m = block_reduce(m, true, red);
    float total = 0.0f;
    for (int64_t s = t; s < S; s += kThreads) {
      factor[s] = m == kNegInf ? 0.0f : expf(part_m[b * S + s] - m);
      total += factor[s] * part_l[b * S + s];
    }
    total = block_reduce(total, false, red);  // its barrier also publishes factor
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t c = t; c < W; c += kThreads) {
      float a = 0.0f;
      for (int64_t s = 0; s < S; ++s)
        if (factor[s] != 0.0f) a += factor[s] * part_acc[(b * S + s) * W + c];
      out[b * W + c] = a * inv;
    }
    if (t == 0) lse[b] = total > 0.0f ? m + logf(total) : kNegInf;
    __syncthreads();  // factor is rewritten for the next query
  }
}

// D[b] = grad_out[b] . out[b]: the sum_j p_j dp_j term of the softmax backward.
__global__ void __launch_bounds__(kThreads)
    dense_grad_dot_kernel(const float* g, const float* grad_lse, const float* out, int64_t B, int64_t W, float* D) {
  __shared__ float red[32];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < W; c += kThreads) acc += g[b * W + c] * out[b * W + c];
    acc = block_reduce(acc, false, red);
    if (threadIdx.x == 0) D[b] = acc - grad_lse[b];  // d lse / d z_j = p_j
  }
}

// Grid (query tiles, row tiles of the chunk): p = exp(z - lse), ds = scale p (dp - D)
// for a tile of 16 queries and 256 rows into P / DS [B, C] (C = chunk stride), with the
// scores and dp = g . v recomputed as register tiles (a key or value row is read once per
// 16 queries), and the tile's share of dq added into the row tile's own partial,
// dq_parts[blockIdx.y] [B, d]: no atomics, so every run sums the same terms in the same
// order. With kMma the scores and dp are recomputed on tensor cores, as the forward
// computed the scores. (Two blocks per SM: without that bound ptxas gave the FMA variant
// 64 registers and spills on sm_90.)
template <typename KT, typename VT, bool kMma>
__global__ void __launch_bounds__(kThreads, 2)
    dense_backward_tile_kernel(const float* g, const float* q, const KT* keys, const VT* values,
                               const int64_t* labels, const int64_t* ids, Exclusions ex, const float* lse,
                               const float* D, int64_t B, int64_t N, int64_t d, int64_t W, float scale, bool l2,
                               int64_t chunk0, int64_t chunk_end, int64_t C, float* P, float* DS, float* dq_parts) {
  __shared__ DenseSmem sm;
  const int t = threadIdx.x;
  float* dq = dq_parts + static_cast<int64_t>(blockIdx.y) * B * d;
  const int64_t r = chunk0 + static_cast<int64_t>(blockIdx.y) * kDenseRows;
  const int n = chunk_end - r < kDenseRows ? static_cast<int>(chunk_end - r) : kDenseRows;
  for (int64_t b0 = static_cast<int64_t>(blockIdx.x) * kDenseQueries; b0 < B;
       b0 += static_cast<int64_t>(gridDim.x) * kDenseQueries) {
    const int nq = B - b0 < kDenseQueries ? static_cast<int>(B - b0) : kDenseQueries;
    float s[4][4], dp[4][4] = {};
    if (kMma) {
      tile_scores_mma(q + b0 * d, nq, keys + r * d, n, d, l2, sm, s);
      if (!labels) tile_scores_mma(g + b0 * W, nq, values + r * W, n, W, false, sm, dp);
    } else {
      tile_scores(q + b0 * d, nq, keys + r * d, n, d, l2, sm, s);
      if (!labels) tile_scores(g + b0 * W, nq, values + r * W, n, W, false, sm, dp);
    }
    __syncthreads();  // the last query tile's reads of sm.p are done
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const int j = tile_query<kMma>(x, y), i = tile_row<kMma>(x, y);
        const int64_t b = b0 + j, row = r + i;
        const bool real = j < nq && i < n;
        float p = 0.0f, dpv = dp[x][y];
        if (real && lse[b] != kNegInf && live(ids, ex, b, row))
          p = expf(scale * (l2 ? -s[x][y] : s[x][y]) - lse[b]);
        if (labels) dpv = real && labels[row] >= 0 && labels[row] < W ? g[b * W + labels[row]] : 0.0f;
        const float dsv = real ? scale * p * (dpv - D[b]) : 0.0f;
        if (real) {
          P[b * C + (row - chunk0)] = p;
          DS[b * C + (row - chunk0)] = dsv;
        }
        sm.p[j][i] = dsv;
      }
    __syncthreads();
    // dq_b += sum_i ds_bi k_i (ip) or 2 sum_i ds_bi (k_i - q_b) (l2): a thread per (query,
    // column), so a key element serves the 16 queries from L1.
    for (int64_t e = t; e < nq * d; e += kThreads) {
      const int j = static_cast<int>(e / d);
      const int64_t c = e % d;
      float acc = 0.0f, total = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float dsv = sm.p[j][i];
        if (dsv == 0.0f) continue;
        acc += dsv * to_float(keys[(r + i) * d + c]);
        total += dsv;
      }
      const float grad = l2 ? 2.0f * (acc - total * q[(b0 + j) * d + c]) : acc;
      if (grad != 0.0f) dq[(b0 + j) * d + c] += grad;
    }
  }
}

// dq = the sum of the S partials [S, n] (n = B d), in partial order.
__global__ void __launch_bounds__(kThreads) dense_dq_sum_kernel(const float* parts, int64_t S, int64_t n, float* dq) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) acc += parts[s * n + e];
    dq[e] = acc;
  }
}

// Blocks of kRowsPerBlock rows of the chunk: dk_j = sum_b ds_bj q_b (ip) or
// 2 sum_b ds_bj (q_b - k_j) (l2), dv_j = sum_b p_bj g_b; each thread owns columns.
template <typename KT>
__global__ void __launch_bounds__(kRowThreads)
    dense_backward_rows_kernel(const float* g, const float* q, const KT* keys, const float* P, const float* DS,
                               int64_t B, int64_t d, int64_t W, bool l2, int64_t chunk0, int64_t chunk_end,
                               int64_t C, float* dkeys, float* dvalues) {
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t j0 = chunk0 + local0;
  const int n = chunk_end - j0 < kRowsPerBlock ? static_cast<int>(chunk_end - j0) : kRowsPerBlock;
  if (dkeys) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc[kRowsPerBlock] = {}, dsum[kRowsPerBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const float qv = q[b * d + c];
        const float* ds = DS + b * C + local0;
#pragma unroll
        for (int i = 0; i < kRowsPerBlock; ++i) {  // a fixed count keeps acc in registers
          const float v = i < n ? ds[i] : 0.0f;
          acc[i] += v * qv;
          dsum[i] += v;
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) {
        const int64_t j = j0 + i;
        if (i < n) dkeys[j * d + c] = l2 ? 2.0f * (acc[i] - dsum[i] * to_float(keys[j * d + c])) : acc[i];
      }
    }
  }
  if (dvalues) {
    for (int64_t c = threadIdx.x; c < W; c += blockDim.x) {
      float acc[kRowsPerBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const float gv = g[b * W + c];
        const float* p = P + b * C + local0;
#pragma unroll
        for (int i = 0; i < kRowsPerBlock; ++i) acc[i] += (i < n ? p[i] : 0.0f) * gv;
      }
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i)
        if (i < n) dvalues[(j0 + i) * W + c] = acc[i];
    }
  }
}

struct DensePlan {
  int64_t rows_per_split, splits;
};

DensePlan plan_dense(int64_t B, int64_t N) {
  const int64_t tiles = B > 0 ? div_up(B, kDenseQueries) : 1;
  const int64_t wanted = kDenseTargetBlocks / tiles > 1 ? kDenseTargetBlocks / tiles : 1;
  int64_t per = div_up(div_up(N, wanted), kDenseRows) * kDenseRows;
  if (per < kDenseRows) per = kDenseRows;
  return {per, div_up(N, per)};
}

// Rows per backward chunk: a multiple of kThreads with B * C weights within budget.
int64_t dense_chunk(int64_t B, int64_t N) {
  const int64_t Bq = B > 0 ? B : 1;
  int64_t c = kDenseChunkBudget / Bq / kThreads * kThreads;
  if (c < kThreads) c = kThreads;
  const int64_t all = div_up(N, kThreads) * kThreads;
  return c < all ? c : all;
}

}  // namespace

size_t dense_forward_workspace_bytes(int64_t batch, int64_t n, int64_t width) {
  const DensePlan p = plan_dense(batch, n);
  return static_cast<size_t>(batch * p.splits * (width + 2)) * sizeof(float);
}

cudaError_t dense_forward(const DenseArgs& a, float* out, float* lse, void* workspace, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const Rows& r = a.rows;
  const DensePlan p = plan_dense(a.batch, r.n);
  auto* part_m = static_cast<float*>(workspace);
  float* part_l = part_m + a.batch * p.splits;
  float* part_acc = part_l + a.batch * p.splits;
  if (p.splits > 0) {
    const cudaError_t err = with_row_types(r, [&](auto kt, auto vt) {
      using KT = typename decltype(kt)::type;
      using VT = typename decltype(vt)::type;
      // Query tiles are the fastest axis: the tiles of one split run together, and L2
      // serves the rows they share.
      return launch(tensor_cores(a.batch) ? dense_split_kernel<KT, VT, true> : dense_split_kernel<KT, VT, false>,
                    dim3(grid_size(div_up(a.batch, kDenseQueries), 1 << 30), static_cast<unsigned>(p.splits)),
                    dim3(kThreads), 0, stream, a.queries, static_cast<const KT*>(r.keys),
                    static_cast<const VT*>(r.values), r.labels, a.slot_ids, a.exclude, a.batch, r.n, r.d, r.width,
                    a.scale, a.l2, p.rows_per_split, part_m, part_l, part_acc);
    });
    if (err != cudaSuccess) return err;
  }
  return launch(dense_combine_kernel, dim3(grid_size(a.batch, 65535)), dim3(kThreads),
                static_cast<size_t>(p.splits) * sizeof(float), stream, part_m, part_l, part_acc, a.batch, p.splits,
                r.width, out, lse);
}

// The backward's workspace: P and DS [B, C], D [B], and a partial of dq [B, d] per row
// tile of a chunk (C / 256 of them: with B C within budget, under budget / 256 x d floats).
size_t dense_backward_workspace_bytes(int64_t batch, int64_t n, int64_t d) {
  const int64_t C = dense_chunk(batch, n);
  return static_cast<size_t>(batch * (2 * C + 1) + div_up(C, kDenseRows) * batch * d) * sizeof(float);
}

cudaError_t dense_backward(const DenseArgs& a, const float* grad_out, const float* grad_lse, const float* out,
                           const float* lse, float* dq, float* dkeys, float* dvalues, void* workspace,
                           cudaStream_t stream) {
  const Rows& r = a.rows;
  if (a.batch == 0 || r.n == 0) {  // no weights: every gradient is zero
    cudaError_t err = cudaMemsetAsync(dq, 0, static_cast<size_t>(a.batch * r.d) * sizeof(float), stream);
    if (err == cudaSuccess && dkeys)
      err = cudaMemsetAsync(dkeys, 0, static_cast<size_t>(r.n * r.d) * sizeof(float), stream);
    if (err == cudaSuccess && dvalues)
      err = cudaMemsetAsync(dvalues, 0, static_cast<size_t>(r.n * r.width) * sizeof(float), stream);
    return err;
  }
  const int64_t C = dense_chunk(a.batch, r.n), parts = div_up(C, kDenseRows);
  auto* P = static_cast<float*>(workspace);
  float* DS = P + a.batch * C;
  float* D = DS + a.batch * C;
  float* dq_parts = D + a.batch;
  cudaError_t err = cudaMemsetAsync(dq_parts, 0, static_cast<size_t>(parts * a.batch * r.d) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const unsigned queries = grid_size(a.batch, 65535);
  err = launch(dense_grad_dot_kernel, dim3(queries), dim3(kThreads), 0, stream, grad_out, grad_lse, out, a.batch,
               r.width, D);
  if (err != cudaSuccess) return err;
  for (int64_t chunk0 = 0; chunk0 < r.n; chunk0 += C) {
    const int64_t end = chunk0 + C < r.n ? chunk0 + C : r.n;
    err = with_row_types(r, [&](auto kt, auto vt) {
      using KT = typename decltype(kt)::type;
      using VT = typename decltype(vt)::type;
      return launch(tensor_cores(a.batch) ? dense_backward_tile_kernel<KT, VT, true>
                                          : dense_backward_tile_kernel<KT, VT, false>,
                    dim3(grid_size(div_up(a.batch, kDenseQueries), 1 << 30),
                         static_cast<unsigned>(div_up(end - chunk0, kDenseRows))),
                    dim3(kThreads), 0, stream,
                    grad_out, a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels,
                    a.slot_ids, a.exclude, lse, D, a.batch, r.n, r.d, r.width, a.scale, a.l2, chunk0, end, C, P, DS,
                    dq_parts);
    });
    if (err != cudaSuccess) return err;
    if (!dkeys && !dvalues) continue;
    err = with_type(r.key_dtype, [&](auto kt) {
      using KT = typename decltype(kt)::type;
      return launch(dense_backward_rows_kernel<KT>, dim3(static_cast<unsigned>(div_up(end - chunk0, kRowsPerBlock))),
                    dim3(kRowThreads), 0, stream, grad_out, a.queries, static_cast<const KT*>(r.keys), P, DS, a.batch,
                    r.d, r.width, a.l2, chunk0, end, C, dkeys, dvalues);
    });
    if (err != cudaSuccess) return err;
  }
  return launch(dense_dq_sum_kernel, dim3(grid_size(div_up(a.batch * r.d, kThreads), 65535)), dim3(kThreads), 0,
                stream, dq_parts, parts, a.batch * r.d, dq);
}

}  // namespace cuda
}  // namespace kmem
