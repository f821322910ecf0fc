// CUDA kernels of kmem: fused top-k search and top-k / dense attention.
//
// Search never holds the [B, N] score matrix. A tile kernel scores a block of 8 queries
// against 512 key rows (each key row is staged once in shared memory for all 8 queries)
// and keeps each query's best min(k, 512) rows of the tile as packed int64 keys; a merge
// kernel folds a bounded chunk of tile candidates into each query's running top-k; a
// final kernel sorts the k survivors. Both selections are one block-wide radix select
// (8-bit digits over the 64-bit keys) that works the same on shared or global memory,
// so k has no upper bound and the per-query scratch stays in global memory when k is
// large. Packed keys order by (score desc, slot asc): the float32 score's bits made
// order-preserving as a signed int in the high word, 0xFFFFFFFF - slot in the low word;
// INT64_MIN means "no row". Real keys are unique (one per slot), which makes the
// selection exact.
//
// Attention over chosen rows runs one block per query: a warp scores a row, the block
// takes the softmax, and the backward scatters into dkeys / dvalues with atomics since
// queries may share rows. Dense attention is flash-decoding: each block runs an online
// softmax over one split of the rows, a combine kernel merges the splits by their
// log-sum-exp; its backward recomputes the weights from lse over bounded row chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "topk_attention.cuh"

namespace kmem {
namespace cuda {
namespace {

constexpr int64_t kNoRow = -9223372036854775807LL - 1;  // INT64_MIN: below every real row
constexpr int kThreads = 256;                            // block size of most kernels
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kNegInf = -INFINITY;

// ----------------------------------------------------------------- helpers
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
}

__device__ __forceinline__ int64_t pack(float score, int64_t slot) {
  if (score == 0.0f) score = 0.0f;  // -0.0 and +0.0 must tie (survives fast-math, unlike + 0.0f)
  int32_t bits = __float_as_int(score);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(bits)) << 32;
  return static_cast<int64_t>(high | (0xFFFFFFFFull - static_cast<uint64_t>(slot)));
}

__device__ __forceinline__ int64_t packed_slot(int64_t key) {
  return key == kNoRow ? -1 : static_cast<int64_t>(0xFFFFFFFFull - (static_cast<uint64_t>(key) & 0xFFFFFFFFull));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum (or max) of v over the block, returned to every thread. `red` holds one value per
// warp; the trailing barrier lets the caller reuse it at once.
__device__ float block_reduce(float v, bool is_max, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = is_max ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = is_max ? kNegInf : 0.0f;
  for (int i = 0; i < warps; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
  __syncthreads();
  return r;
}

// Score of one key row against q, by one warp (lanes stride over d): every lane gets it.
template <typename KT>
__device__ float warp_row_score(const float* q, const KT* row, int64_t d, bool l2) {
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < d; c += 32) {
    const float kv = to_float(row[c]);
    acc += l2 ? (q[c] - kv) * (q[c] - kv) : q[c] * kv;
  }
  acc = warp_sum(acc);
  return l2 ? -acc : acc;
}

// Dot product of a float row with a row of T, by one warp.
template <typename T>
__device__ float warp_dot(const float* a, const T* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < n; c += 32) acc += a[c] * to_float(b[c]);
  return warp_sum(acc);
}

// Whether query b lists `id` among its excluded ids (binary search of its sorted row).
__device__ bool excluded(const Exclusions& ex, int64_t b, int64_t id) {
  if (ex.width == 0) return false;
  const int64_t* row = ex.sorted + b * ex.width;
  int64_t lo = 0, hi = ex.width;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return lo < ex.width && row[lo] == id;
}

__device__ __forceinline__ bool live(const int64_t* ids, const Exclusions& ex, int64_t b, int64_t row) {
  return ids[row] >= 0 && !excluded(ex, b, ids[row]);
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args... args) {
  if (smem > 48 * 1024) {  // beyond the default limit a kernel must opt in
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}

unsigned grid_size(int64_t blocks, int64_t cap) { return static_cast<unsigned>(blocks < cap ? blocks : cap); }

constexpr int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>) with T the C++ type of dtype.
template <typename F>
cudaError_t with_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f16: return f(Tag<__half>{});
    case Dtype::bf16: return f(Tag<__nv_bfloat16>{});
    default: return f(Tag<float>{});
  }
}

// Calls f(Tag<KT>, Tag<VT>) for the rows' key and value types (VT = float for labels,
// whose values pointer is unused: no need to instantiate it three times).
template <typename F>
cudaError_t with_row_types(const Rows& r, F&& f) {
  return with_type(r.key_dtype, [&](auto kt) {
    if (r.labels) return f(kt, Tag<float>{});
    return with_type(r.value_dtype, [&](auto vt) { return f(kt, vt); });
  });
}

// ------------------------------------------------------------ radix select
// Shared state of one block-wide selection.
struct SelectShared {
  unsigned hist[256];
  unsigned long long found;
  unsigned long long remaining;
  unsigned digit, count, taken;
};

// One query's candidate keys: `a` then `b`, in shared or global memory.
struct KeySpan {
  const int64_t* a;
  int64_t na;
  const int64_t* b;
  int64_t nb;
  __device__ int64_t size() const { return na + nb; }
  __device__ int64_t operator[](int64_t i) const { return i < na ? a[i] : b[i - na]; }
};

// Packed keys as unsigned integers in the same order (sign bit flipped).
__device__ __forceinline__ uint64_t radix_key(int64_t key) { return static_cast<uint64_t>(key) ^ (1ull << 63); }

// By warp 0: the bin (from the top) holding the `remaining`-th largest key, the rank
// left within it and its count. Lane l sums bins 255-8l down to 248-8l.
__device__ void find_digit(SelectShared& sh, unsigned long long remaining) {
  const int lane = threadIdx.x;
  unsigned local = 0;
  for (int i = 0; i < 8; ++i) local += sh.hist[255 - 8 * lane - i];
  unsigned incl = local;
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned v = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += v;
  }
  unsigned long long cum = incl - local;
  if (cum >= remaining || remaining > incl) return;  // exactly one lane holds the rank
  for (int i = 0; i < 8; ++i) {
    const int bin = 255 - 8 * lane - i;
    const unsigned c = sh.hist[bin];
    if (cum + c >= remaining) {
      sh.digit = bin;
      sh.remaining = remaining - cum;
      sh.count = c;
      return;
    }
    cum += c;
  }
}

// The want-th largest key of `keys` (1 <= want <= keys.size()), by the whole block.
__device__ int64_t block_kth_largest(const KeySpan& keys, int64_t want, SelectShared& sh) {
  const int64_t n = keys.size();
  uint64_t prefix = 0, mask = 0;
  unsigned long long remaining = static_cast<unsigned long long>(want);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t u = radix_key(keys[i]);
      if ((u & mask) == prefix) atomicAdd(&sh.hist[(u >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) find_digit(sh, remaining);
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.digit) << shift;
    mask |= 0xFFull << shift;
    remaining = sh.remaining;
    if (sh.count == 1 && shift > 0) {  // one key has this prefix: it is the answer
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const uint64_t u = radix_key(keys[i]);
        if ((u & mask) == prefix) sh.found = u;
      }
      __syncthreads();
      return static_cast<int64_t>(sh.found ^ (1ull << 63));
    }
  }
  return static_cast<int64_t>(prefix ^ (1ull << 63));
}

// The `want` largest keys of `keys` into out[0, want), unordered, "no row" filling the
// places past the real keys. `out` must not overlap `keys`.
__device__ void block_top(const KeySpan& keys, int64_t want, int64_t* out, SelectShared& sh) {
  const int64_t n = keys.size();
  if (n <= want) {
    for (int64_t i = threadIdx.x; i < want; i += blockDim.x) out[i] = i < n ? keys[i] : kNoRow;
    __syncthreads();
    return;
  }
  const int64_t kth = block_kth_largest(keys, want, sh);
  if (threadIdx.x == 0) sh.taken = 0;
  __syncthreads();
  // Real keys are unique, so exactly want - 1 keys beat a real kth; when kth is "no
  // row", fewer real keys than `want` exist and the rest is padding.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t key = keys[i];
    if (key > kth) out[atomicAdd(&sh.taken, 1u)] = key;
  }
  __syncthreads();
  for (int64_t i = sh.taken + threadIdx.x; i < want; i += blockDim.x) out[i] = kth;
  __syncthreads();
}

// In-place descending bitonic sort of x[0, n), n a power of two, by the whole block.
__device__ void block_sort_desc(int64_t* x, int64_t n) {
  for (int64_t size = 2; size <= n; size <<= 1) {
    for (int64_t stride = size / 2; stride > 0; stride >>= 1) {
      for (int64_t i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int64_t lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const int64_t a = x[lo], b = x[hi];
        if (desc ? a < b : a > b) {
          x[lo] = b;
          x[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------ search kernels
constexpr int kQueryBlock = 8;    // queries scored together: each staged key row serves all 8
constexpr int kTileRows = 512;    // rows per tile; a tile keeps min(k, 512) candidates per query
constexpr int kDimChunk = 32;     // key columns staged at a time
constexpr int kMergeThreads = 512;
constexpr int kSortSmemKeys = 4096;           // final sort in shared memory up to this many keys
constexpr int64_t kCandidateBudget = 1 << 24;  // candidate keys per chunk, all queries (128 MiB)
constexpr int64_t kCandidatesPerQuery = 1 << 20;

struct TileSmem {
  int64_t packed[kQueryBlock][kTileRows];
  alignas(16) float qstage[kDimChunk][kQueryBlock];
  float kstage[kThreads][kDimChunk + 1];  // +1: rows land in distinct banks
  SelectShared select;
};

// acc[i] += q_(b0+i) . keys[row], norm += |keys[row]|^2 for this thread's row of the
// sub-tile starting at `first`; all threads stage columns together.
template <typename KT>
__device__ void score_subtile(const float* q, const KT* keys, int64_t B, int64_t N, int64_t d, int64_t b0,
                              int64_t first, TileSmem& sm, float (&acc)[kQueryBlock], float& norm) {
  const int t = threadIdx.x;
  for (int64_t c0 = 0; c0 < d; c0 += kDimChunk) {
    for (int e = t; e < kThreads * kDimChunk; e += kThreads) {
      const int r = e / kDimChunk, c = e % kDimChunk;
      const int64_t row = first + r;
      sm.kstage[r][c] = row < N && c0 + c < d ? to_float(keys[row * d + c0 + c]) : 0.0f;
    }
    for (int e = t; e < kQueryBlock * kDimChunk; e += kThreads) {
      const int qi = e / kDimChunk, c = e % kDimChunk;
      sm.qstage[c][qi] = b0 + qi < B && c0 + c < d ? q[(b0 + qi) * d + c0 + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kDimChunk; ++c) {  // zero padding adds nothing past d
      const float kv = sm.kstage[t][c];
      const float4 lo = *reinterpret_cast<const float4*>(&sm.qstage[c][0]);
      const float4 hi = *reinterpret_cast<const float4*>(&sm.qstage[c][4]);
      acc[0] += lo.x * kv;
      acc[1] += lo.y * kv;
      acc[2] += lo.z * kv;
      acc[3] += lo.w * kv;
      acc[4] += hi.x * kv;
      acc[5] += hi.y * kv;
      acc[6] += hi.z * kv;
      acc[7] += hi.w * kv;
      norm += kv * kv;
    }
    __syncthreads();
  }
}

// Grid (tiles of this chunk, query blocks): candidates [B, tiles, keep] for tiles
// first_tile... of the memory.
template <typename KT>
__global__ void __launch_bounds__(kThreads)
    search_tiles_kernel(const float* q, const KT* keys, const int64_t* ids, Exclusions ex, int64_t B, int64_t N,
                        int64_t d, bool l2, int64_t first_tile, int64_t keep, int64_t* cand) {
  TileSmem& sm = *dynamic_smem<TileSmem>();
  const int t = threadIdx.x;
  const int64_t row0 = (first_tile + blockIdx.x) * kTileRows;
  const int64_t rows = N - row0 < kTileRows ? N - row0 : kTileRows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * keep;  // candidates per query in this chunk
  for (int64_t b0 = static_cast<int64_t>(blockIdx.y) * kQueryBlock; b0 < B;
       b0 += static_cast<int64_t>(gridDim.y) * kQueryBlock) {
    for (int sub = 0; sub < kTileRows / kThreads; ++sub) {
      float acc[kQueryBlock] = {};
      float norm = 0.0f;
      const int64_t local = sub * kThreads + t;
      score_subtile(q, keys, B, N, d, b0, row0 + sub * kThreads, sm, acc, norm);
      for (int qi = 0; qi < kQueryBlock; ++qi) {
        const int64_t b = b0 + qi, row = row0 + local;
        const bool ok = local < rows && b < B && live(ids, ex, b, row);
        sm.packed[qi][local] = ok ? pack(l2 ? 2.0f * acc[qi] - norm : acc[qi], row) : kNoRow;
      }
    }
    __syncthreads();
    for (int qi = 0; qi < kQueryBlock && b0 + qi < B; ++qi) {
      const KeySpan span{sm.packed[qi], rows, nullptr, 0};
      block_top(span, keep, cand + (b0 + qi) * stride + blockIdx.x * keep, sm.select);
    }
  }
}

// best_out[b] = top-k of best_in[b] (absent when null) and the chunk's candidates.
__global__ void __launch_bounds__(kMergeThreads)
    search_merge_kernel(const int64_t* best_in, const int64_t* cand, int64_t per_query, int64_t B, int64_t k,
                        int64_t* best_out) {
  __shared__ SelectShared sh;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const KeySpan span{best_in ? best_in + b * k : nullptr, best_in ? k : 0, cand + b * per_query, per_query};
    block_top(span, k, best_out + b * k, sh);
  }
}

// slots[b] = the slots of best[b], best first. Sorts in shared memory when the padded
// size fits (`scratch` null), else in scratch [B, padded].
__global__ void __launch_bounds__(kMergeThreads)
    search_sort_kernel(const int64_t* best, int64_t B, int64_t k, int64_t padded, int64_t* scratch,
                       int64_t* slots) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int64_t* x = scratch ? scratch + b * padded : dynamic_smem<int64_t>();
    for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) x[i] = i < k ? best[b * k + i] : kNoRow;
    __syncthreads();
    block_sort_desc(x, padded);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) slots[b * k + i] = packed_slot(x[i]);
    __syncthreads();
  }
}

// Sizes of one search call; the workspace holds cand, then two best buffers, then the
// sort scratch.
struct SearchPlan {
  int64_t keep, tiles, tiles_per_chunk, padded;
  size_t cand_bytes, best_bytes, sort_bytes;
};

SearchPlan plan_search(int64_t B, int64_t N, int64_t k) {
  SearchPlan p{};
  p.keep = k < kTileRows ? k : kTileRows;
  p.tiles = div_up(N, kTileRows);
  const int64_t Bq = B > 0 ? B : 1;
  int64_t per_chunk = kCandidateBudget / (Bq * p.keep);
  if (per_chunk > kCandidatesPerQuery / p.keep) per_chunk = kCandidatesPerQuery / p.keep;
  if (per_chunk > p.tiles) per_chunk = p.tiles;
  p.tiles_per_chunk = per_chunk > 1 ? per_chunk : 1;
  p.padded = 1;
  while (p.padded < k) p.padded <<= 1;
  p.cand_bytes = static_cast<size_t>(B * p.tiles_per_chunk * p.keep) * sizeof(int64_t);
  p.best_bytes = static_cast<size_t>(B * k) * sizeof(int64_t);
  p.sort_bytes = p.padded > kSortSmemKeys ? static_cast<size_t>(B * p.padded) * sizeof(int64_t) : 0;
  return p;
}

// ---------------------------------------------------- attention over slots
__device__ __forceinline__ bool valid_slot(int64_t s, int64_t n) { return s >= 0 && s < n; }

template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    attend_forward_kernel(const float* q, const KT* keys, const VT* values, const int64_t* labels,
                          const int64_t* slots, int64_t B, int64_t N, int64_t d, int64_t k, int64_t W, float scale,
                          bool l2, float* out, float* w) {
  __shared__ float red[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float* qb = q + b * d;
    const int64_t* sb = slots + b * k;
    float* wb = w + b * k;
    for (int64_t j = warp; j < k; j += kWarps) {
      const bool ok = valid_slot(sb[j], N);
      const float z = ok ? scale * warp_row_score(qb, keys + sb[j] * d, d, l2) : kNegInf;
      if (lane == 0) wb[j] = z;
    }
    __syncthreads();
    float m = kNegInf;
    for (int64_t j = t; j < k; j += kThreads) m = fmaxf(m, wb[j]);
    m = block_reduce(m, true, red);
    if (m == kNegInf) {  // no valid slot: zero weights, zero output (out is pre-zeroed)
      for (int64_t j = t; j < k; j += kThreads) wb[j] = 0.0f;
      continue;
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
    float* ob = out + b * W;
    if (labels) {
      for (int64_t j = t; j < k; j += kThreads) {
        if (!valid_slot(sb[j], N)) continue;
        const int64_t c = labels[sb[j]];
        if (c >= 0 && c < W) atomicAdd(ob + c, wb[j]);
      }
    } else {
      for (int64_t c = t; c < W; c += kThreads) {
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j)
          if (valid_slot(sb[j], N)) acc += wb[j] * to_float(values[sb[j] * W + c]);
        ob[c] = acc;
      }
    }
  }
}

// dz_j = w_j (dw_j - sum_i w_i dw_i), ds_j = scale * dz_j with dw_j = g . v_j (or
// g[label_j]); dq = sum_j ds_j k_j (ip) or -2 sum_j ds_j (q - k_j) (l2); dk_j += ds_j q
// (ip) or 2 ds_j (q - k_j) (l2); dv_j += w_j g.
template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    attend_backward_kernel(const float* g, const float* q, const KT* keys, const VT* values, const int64_t* labels,
                           const int64_t* slots, const float* w, int64_t B, int64_t N, int64_t d, int64_t k,
                           int64_t W, float scale, bool l2, float* ds, float* dq, float* dkeys, float* dvalues) {
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
      if (!valid_slot(s, N)) continue;
      const float dsv = dsb[j], wv = wb[j];
      if (dkeys && dsv != 0.0f) {
        for (int64_t c = t; c < d; c += kThreads) {
          const float grad = l2 ? 2.0f * dsv * (qb[c] - to_float(keys[s * d + c])) : dsv * qb[c];
          atomicAdd(dkeys + s * d + c, grad);
        }
      }
      if (dvalues && wv != 0.0f) {
        for (int64_t c = t; c < W; c += kThreads) atomicAdd(dvalues + s * W + c, wv * gb[c]);
      }
    }
  }
}

// ------------------------------------------------------ dense attention
constexpr int64_t kDenseTargetBlocks = 1024;  // splits x queries aimed for in the forward
constexpr int kRowsPerBlock = 8;              // rows per block of the dkeys / dvalues kernel
constexpr int kRowThreads = 128;
constexpr int64_t kDenseChunkBudget = 1 << 22;  // weights kept per backward chunk, all queries

// Logits scale * score of rows [r, r + kThreads) of query b into z (-inf when dead,
// excluded or past `end`), one warp per row.
template <typename KT>
__device__ void tile_logits(const float* qb, const KT* keys, const int64_t* ids, const Exclusions& ex, int64_t b,
                            int64_t r, int64_t end, int64_t d, float scale, bool l2, float* z) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = warp; i < kThreads; i += kWarps) {
    const int64_t j = r + i;
    const bool ok = j < end && live(ids, ex, b, j);
    const float v = ok ? scale * warp_row_score(qb, keys + j * d, d, l2) : kNegInf;
    if (lane == 0) z[i] = v;
  }
  __syncthreads();
}

// Grid (splits, queries): an online softmax over one split of the rows. Leaves the
// split's running max m, sum l and unnormalised acc [W] (relative to m).
template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    dense_split_kernel(const float* q, const KT* keys, const VT* values, const int64_t* labels, const int64_t* ids,
                       Exclusions ex, int64_t B, int64_t N, int64_t d, int64_t W, float scale, bool l2,
                       int64_t rows_per_split, float* part_m, float* part_l, float* part_acc) {
  __shared__ float z[kThreads];
  __shared__ int64_t lab[kThreads];
  __shared__ float red[32];
  const int t = threadIdx.x;
  const int64_t S = gridDim.x, s = blockIdx.x;
  const int64_t r0 = s * rows_per_split, r1 = r0 + rows_per_split < N ? r0 + rows_per_split : N;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float* acc = part_acc + (b * S + s) * W;
    for (int64_t c = t; c < W; c += kThreads) acc[c] = 0.0f;
    float m_run = kNegInf, l_run = 0.0f;
    for (int64_t r = r0; r < r1; r += kThreads) {
      tile_logits(q + b * d, keys, ids, ex, b, r, r1, d, scale, l2, z);
      const float m_new = fmaxf(m_run, block_reduce(z[t], true, red));
      if (m_new == kNegInf) continue;  // nothing live yet
      const float alpha = expf(m_run - m_new);
      const float p = expf(z[t] - m_new);  // 0 for -inf
      l_run = l_run * alpha + block_reduce(p, false, red);
      m_run = m_new;
      z[t] = p;
      if (labels) lab[t] = r + t < r1 ? labels[r + t] : -1;
      __syncthreads();
      const int n = r1 - r < kThreads ? static_cast<int>(r1 - r) : kThreads;
      // Each thread owns columns c, so no atomics: labels scan the tile per column.
      for (int64_t c = t; c < W; c += kThreads) {
        float a = acc[c] * alpha;
        for (int i = 0; i < n; ++i) {
          if (z[i] == 0.0f) continue;
          if (labels) a += lab[i] == c ? z[i] : 0.0f;
          else a += z[i] * to_float(values[(r + i) * W + c]);
        }
        acc[c] = a;
      }
      __syncthreads();
    }
    if (t == 0) {
      part_m[b * S + s] = m_run;
      part_l[b * S + s] = l_run;
    }
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

// Grid (row tiles of the chunk, queries): p = exp(z - lse), ds = scale p (dp - D) for
// the tile's rows into P / DS [B, C] (C = chunk stride), and the tile's share of dq.
template <typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    dense_backward_tile_kernel(const float* g, const float* q, const KT* keys, const VT* values,
                               const int64_t* labels, const int64_t* ids, Exclusions ex, const float* lse,
                               const float* D, int64_t B, int64_t N, int64_t d, int64_t W, float scale, bool l2,
                               int64_t chunk0, int64_t chunk_end, int64_t C, float* P, float* DS, float* dq) {
  __shared__ float z[kThreads];
  __shared__ float dsv[kThreads];
  __shared__ float red[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t r = chunk0 + static_cast<int64_t>(blockIdx.x) * kThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float *qb = q + b * d, *gb = g + b * W;
    tile_logits(qb, keys, ids, ex, b, r, chunk_end, d, scale, l2, z);
    for (int i = warp; i < kThreads; i += kWarps) {  // dp_i = g . v_i into dsv for now
      const int64_t j = r + i;
      float dp = 0.0f;
      if (z[i] != kNegInf) {
        if (labels) dp = labels[j] >= 0 && labels[j] < W ? gb[labels[j]] : 0.0f;
        else dp = warp_dot(gb, values + j * W, W);
      }
      if (lane == 0) dsv[i] = dp;
    }
    __syncthreads();
    const float p = lse[b] == kNegInf ? 0.0f : expf(z[t] - lse[b]);
    const float dsi = scale * p * (dsv[t] - D[b]);
    const int64_t at = b * C + (r - chunk0) + t;
    P[at] = p;
    DS[at] = dsi;
    const float total = block_reduce(dsi, false, red);  // its barriers order dsv reads before the write
    dsv[t] = dsi;
    __syncthreads();
    const int n = chunk_end - r < kThreads ? static_cast<int>(chunk_end - r) : kThreads;
    for (int64_t c = t; c < d; c += kThreads) {
      float acc = 0.0f;
      for (int i = 0; i < n; ++i)
        if (dsv[i] != 0.0f) acc += dsv[i] * to_float(keys[(r + i) * d + c]);
      const float grad = l2 ? 2.0f * (acc - total * qb[c]) : acc;
      if (grad != 0.0f) atomicAdd(dq + b * d + c, grad);
    }
    __syncthreads();
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
        for (int i = 0; i < n; ++i) {
          acc[i] += ds[i] * qv;
          dsum[i] += ds[i];
        }
      }
      for (int i = 0; i < n; ++i) {
        const int64_t j = j0 + i;
        dkeys[j * d + c] = l2 ? 2.0f * (acc[i] - dsum[i] * to_float(keys[j * d + c])) : acc[i];
      }
    }
  }
  if (dvalues) {
    for (int64_t c = threadIdx.x; c < W; c += blockDim.x) {
      float acc[kRowsPerBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const float gv = g[b * W + c];
        const float* p = P + b * C + local0;
        for (int i = 0; i < n; ++i) acc[i] += p[i] * gv;
      }
      for (int i = 0; i < n; ++i) dvalues[(j0 + i) * W + c] = acc[i];
    }
  }
}

struct DensePlan {
  int64_t rows_per_split, splits;
};

DensePlan plan_dense(int64_t B, int64_t N) {
  const int64_t Bq = B > 0 ? B : 1;
  const int64_t wanted = kDenseTargetBlocks / Bq > 1 ? kDenseTargetBlocks / Bq : 1;
  int64_t per = div_up(div_up(N, wanted), kThreads) * kThreads;
  if (per < kThreads) per = kThreads;
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

// ------------------------------------------------------------------ launchers
size_t search_workspace_bytes(int64_t batch, int64_t n, int64_t k) {
  const SearchPlan p = plan_search(batch, n, k);
  return p.cand_bytes + 2 * p.best_bytes + p.sort_bytes;
}

cudaError_t search(const SearchArgs& a, int64_t* slots, void* workspace, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.n == 0) return cudaMemsetAsync(slots, 0xFF, static_cast<size_t>(a.batch * a.k) * sizeof(int64_t), stream);
  const SearchPlan p = plan_search(a.batch, a.n, a.k);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* cand = reinterpret_cast<int64_t*>(base);
  int64_t* best[2] = {reinterpret_cast<int64_t*>(base + p.cand_bytes),
                      reinterpret_cast<int64_t*>(base + p.cand_bytes + p.best_bytes)};
  auto* sort_scratch = p.sort_bytes ? reinterpret_cast<int64_t*>(base + p.cand_bytes + 2 * p.best_bytes) : nullptr;
  const unsigned query_blocks = grid_size(div_up(a.batch, kQueryBlock), 65535);
  const unsigned per_query_blocks = grid_size(a.batch, 65535);
  int cur = -1;  // best buffer holding the running top-k; none before the first chunk
  for (int64_t tile = 0; tile < p.tiles; tile += p.tiles_per_chunk) {
    const int64_t nt = p.tiles - tile < p.tiles_per_chunk ? p.tiles - tile : p.tiles_per_chunk;
    cudaError_t err = with_type(a.key_dtype, [&](auto kt) {
      using KT = typename decltype(kt)::type;
      return launch(search_tiles_kernel<KT>, dim3(static_cast<unsigned>(nt), query_blocks), dim3(kThreads),
                    sizeof(TileSmem), stream, a.queries, static_cast<const KT*>(a.keys), a.slot_ids, a.exclude,
                    a.batch, a.n, a.d, a.l2, tile, p.keep, cand);
    });
    if (err != cudaSuccess) return err;
    const int next = cur == 0 ? 1 : 0;
    err = launch(search_merge_kernel, dim3(per_query_blocks), dim3(kMergeThreads), 0, stream,
                 cur < 0 ? nullptr : best[cur], cand, nt * p.keep, a.batch, a.k, best[next]);
    if (err != cudaSuccess) return err;
    cur = next;
  }
  const size_t smem = sort_scratch ? 0 : static_cast<size_t>(p.padded) * sizeof(int64_t);
  return launch(search_sort_kernel, dim3(per_query_blocks), dim3(kMergeThreads), smem, stream, best[cur], a.batch,
                a.k, p.padded, sort_scratch, slots);
}

cudaError_t attend_forward(const AttendArgs& a, float* out, float* weights, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const Rows& r = a.rows;
  cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(a.batch * r.width) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  return with_row_types(r, [&](auto kt, auto vt) {
    using KT = typename decltype(kt)::type;
    using VT = typename decltype(vt)::type;
    return launch(attend_forward_kernel<KT, VT>, dim3(grid_size(a.batch, 65535)), dim3(kThreads), 0, stream,
                  a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels, a.slots,
                  a.batch, r.n, r.d, a.k, r.width, a.scale, a.l2, out, weights);
  });
}

cudaError_t attend_backward(const AttendArgs& a, const float* grad_out, const float* weights, float* ds, float* dq,
                            float* dkeys, float* dvalues, cudaStream_t stream) {
  const Rows& r = a.rows;
  cudaError_t err = cudaSuccess;
  if (dkeys) err = cudaMemsetAsync(dkeys, 0, static_cast<size_t>(r.n * r.d) * sizeof(float), stream);
  if (err == cudaSuccess && dvalues)
    err = cudaMemsetAsync(dvalues, 0, static_cast<size_t>(r.n * r.width) * sizeof(float), stream);
  if (err != cudaSuccess || a.batch == 0) return err;
  return with_row_types(r, [&](auto kt, auto vt) {
    using KT = typename decltype(kt)::type;
    using VT = typename decltype(vt)::type;
    return launch(attend_backward_kernel<KT, VT>, dim3(grid_size(a.batch, 65535)), dim3(kThreads), 0, stream,
                  grad_out, a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels,
                  a.slots, weights, a.batch, r.n, r.d, a.k, r.width, a.scale, a.l2, ds, dq, dkeys, dvalues);
  });
}

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
      return launch(dense_split_kernel<KT, VT>, dim3(static_cast<unsigned>(p.splits), grid_size(a.batch, 65535)),
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

size_t dense_backward_workspace_bytes(int64_t batch, int64_t n) {
  return static_cast<size_t>(batch * (2 * dense_chunk(batch, n) + 1)) * sizeof(float);
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
  const int64_t C = dense_chunk(a.batch, r.n);
  auto* P = static_cast<float*>(workspace);
  float* DS = P + a.batch * C;
  float* D = DS + a.batch * C;
  cudaError_t err = cudaMemsetAsync(dq, 0, static_cast<size_t>(a.batch * r.d) * sizeof(float), stream);
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
      return launch(dense_backward_tile_kernel<KT, VT>,
                    dim3(static_cast<unsigned>(div_up(end - chunk0, kThreads)), queries), dim3(kThreads), 0, stream,
                    grad_out, a.queries, static_cast<const KT*>(r.keys), static_cast<const VT*>(r.values), r.labels,
                    a.slot_ids, a.exclude, lse, D, a.batch, r.n, r.d, r.width, a.scale, a.l2, chunk0, end, C, P, DS,
                    dq);
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
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kmem
