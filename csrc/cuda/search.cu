// CUDA top-k search: never holds the [B, N] score matrix. A span kernel scores a block
// of 8 queries against the 512-row tiles of a span of the rows (each key row is staged
// once in shared memory for all 8 queries) and keeps each query's best min(k, 512) rows
// as packed int64 keys; past k = 512 a span is one tile, and a merge kernel folds a
// bounded chunk of span candidates into each query's running top-k; a final kernel
// merges the last candidates, sorts the k survivors (and may attend over them). Every
// selection is one block-wide radix select (8-bit digits over the 64-bit keys) that works
// the same on shared or global memory, so k has no upper bound and the per-query scratch
// stays in global memory when k is large. Packed keys order by (score desc, slot asc): the
// float32 score's bits made order-preserving as a signed int in the high word,
// 0xFFFFFFFF - slot in the low word; INT64_MIN means "no row". Real keys are unique
// (one per slot), which makes the selection exact. Above 16 queries (k <= 256, sm_80 and
// later) a span block takes 32 queries, screens each 256-row sub-tile for all of them on
// tensor cores (TF32) against the running thresholds, and scores in float32 only the
// sub-tiles and groups of 8 queries that may reach them: the same keys, bit for bit, as
// the float32 scan.
#include "attend_query.cuh"

namespace kmem {
namespace cuda {
using namespace detail;
namespace {

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
// places past the real keys. `out` must not overlap `keys`. Returns the want-th largest
// key when there were more than `want`, else "no row".
__device__ int64_t block_top(const KeySpan& keys, int64_t want, int64_t* out, SelectShared& sh) {
  const int64_t n = keys.size();
  if (n <= want) {
    for (int64_t i = threadIdx.x; i < want; i += blockDim.x) out[i] = i < n ? keys[i] : kNoRow;
    __syncthreads();
    return kNoRow;
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
  return kth;
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
constexpr int kQueryBlock = 8;    // queries scored together in float32: each staged key row serves all 8
constexpr int kWideBlock = 32;    // queries a tensor-core block screens together, in groups of kQueryBlock
constexpr int kWideKeep = 256;    // the largest k of tensor-core blocks: 32 running bests fit in shared memory
constexpr int kTileRows = 512;    // rows per tile; a tile keeps min(k, 512) candidates per query
constexpr int kDimChunk = 32;     // key columns staged at a time
constexpr int kMergeThreads = 512;
constexpr int kSortSmemKeys = 4096;           // final sort in shared memory up to this many keys
constexpr int kMergeSmemKeys = 4096;          // the merge selects in shared memory up to this many survivors
constexpr int64_t kCandidateBudget = 1 << 24;  // candidate keys of all queries (128 MiB)
constexpr int kSpansPerSM = 4;                 // blocks aimed for per SM: query blocks x row spans
constexpr int kWideSpansPerSM = 2;             // the same for tensor-core blocks (two fit an SM's shared memory)

// The shared memory of a span block of Q queries (kQueryBlock, or kWideBlock on tensor
// cores: G = Q / kQueryBlock groups, scored in float32 one group at a time); its running
// best keys follow it in the dynamic shared memory: best, then next, each [Q][keep].
template <int Q>
struct TileSmem {
  static constexpr int G = Q / kQueryBlock;
  int64_t packed[kQueryBlock][kTileRows];  // each query of a group: its surviving keys of the tile, count[qi] of them
  unsigned long long theta[Q];
  unsigned count[kQueryBlock];
  unsigned kept[Q];        // real keys in each query's running best
  unsigned reach[2][G];    // whether the screen sends each sub-tile on to a group's float32 scoring
  alignas(16) float qstage[kDimChunk][Q];
  float kstage[kThreads][kDimChunk + 1];  // +1: rows land in distinct banks
  float norm[kThreads];                   // the screen's |k|^2 of the sub-tile's rows
  float qslack[Q];                        // the screen's slack |q| per query
  SelectShared select;
};

// Stages columns [c0, c0 + kDimChunk) of the sub-tile starting at row `first` and of the
// QS queries from b0 (qstage[c][0, QS)), by all threads together.
template <int QS, int Q, typename KT>
__device__ void stage_columns(const float* q, const KT* keys, int64_t B, int64_t N, int64_t d, int64_t b0,
                              int64_t first, int64_t c0, TileSmem<Q>& sm) {
  const int t = threadIdx.x;
  const int64_t rows = first < N ? N - first : 0;
  stage_tile<kThreads, kDimChunk>(keys + (first < N ? first : N) * d, d, rows, c0,
                                  [&](int r, int c, float x) { sm.kstage[r][c] = x; });
  for (int e = t; e < QS * kDimChunk; e += kThreads) {
    const int qi = e / kDimChunk, c = e % kDimChunk;
    sm.qstage[c][qi] = b0 + qi < B && c0 + c < d ? q[(b0 + qi) * d + c0 + c] : 0.0f;
  }
}

// acc[i] += q_(b0+i) . keys[row], norm += |keys[row]|^2 for this thread's row of the
// sub-tile starting at `first`, in float32, for the kQueryBlock queries from b0.
template <int Q, typename KT>
__device__ void score_subtile(const float* q, const KT* keys, int64_t B, int64_t N, int64_t d, int64_t b0,
                              int64_t first, TileSmem<Q>& sm, float (&acc)[kQueryBlock], float& norm) {
  const int t = threadIdx.x;
  for (int64_t c0 = 0; c0 < d; c0 += kDimChunk) {
    stage_columns<kQueryBlock>(q, keys, B, N, d, b0, first, c0, sm);
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

// Sets sm.reach[sub][g] where some live row of the sub-tile starting at `first` may
// reach the running threshold of a query of group g (queries B0 + 8 g to B0 + 8 g + 7).
// The rows are scored on tensor cores in TF32, off the float32 score by at most slack
// |q| |k| (see tf32_slack); a row passes only if even that margin leaves it below the
// threshold's score, so the float32 scan skips nothing that could survive it. Warp w
// scores rows 32 w to 32 w + 31 as two 16-row MMA tiles against each group's 8 queries,
// reading a staged key once for all Q queries. Ends with a barrier.
template <int Q, typename KT>
__device__ void screen_subtile(const float* q, const KT* keys, const int64_t* ids, int64_t B, int64_t N, int64_t d,
                               bool l2, int64_t B0, int64_t first, int sub, TileSmem<Q>& sm) {
  constexpr int G = TileSmem<Q>::G;
  const int t = threadIdx.x, lane = t % 32, g = lane / 4, c4 = lane % 4, base = t / 32 * 32;
  float acc[2][G][4] = {}, norm = 0.0f;
  for (int64_t c0 = 0; c0 < d; c0 += kDimChunk) {
    stage_columns<Q>(q, keys, B, N, d, B0, first, c0, sm);
    __syncthreads();
    for (int c = 0; c < kDimChunk; ++c) norm += sm.kstage[t][c] * sm.kstage[t][c];
#pragma unroll 1  // unrolled, sm_90 spilled: the accumulators take 32 registers
    for (int k0 = 0; k0 < kDimChunk; k0 += 8) {
      float a[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int r = base + 16 * m + g;
        a[m][0] = sm.kstage[r][k0 + c4];
        a[m][1] = sm.kstage[r + 8][k0 + c4];
        a[m][2] = sm.kstage[r][k0 + c4 + 4];
        a[m][3] = sm.kstage[r + 8][k0 + c4 + 4];
      }
#pragma unroll
      for (int n = 0; n < G; ++n) {
        const float b[2] = {sm.qstage[k0 + c4][8 * n + g], sm.qstage[k0 + c4 + 4][8 * n + g]};
        mma_tf32(acc[0][n], a[0], b);
        mma_tf32(acc[1][n], a[1], b);
      }
    }
    __syncthreads();
  }
  sm.norm[t] = norm;
  __syncthreads();
#pragma unroll
  for (int n = 0; n < G; ++n) {
    bool reach = false;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = base + 16 * m + g + (i >= 2 ? 8 : 0), qi = 8 * n + 2 * c4 + (i & 1);
        const int64_t row = first + r;
        if (row >= N || B0 + qi >= B || ids[row] < 0) continue;
        const float approx = l2 ? 2.0f * acc[m][n][i] - sm.norm[r] : acc[m][n][i];
        // d * 2^-110: what products flushed to zero below float32's normal range may lose.
        const float bound = sm.qslack[qi] * sqrtf(sm.norm[r]) + static_cast<float>(d) * 7.7e-34f;
        const float theta = packed_score(static_cast<int64_t>(sm.theta[qi] ^ (1ull << 63)));
        if (!(approx + bound < theta)) reach = true;  // "not below": a NaN reaches
      }
    if (reach) sm.reach[sub][n] = 1;
  }
  __syncthreads();
}

// The running threshold of query b: the radix key of a k-th best key some tile found
// (0: none yet). Exactly k real keys of that tile lie at or above it, so a key below it
// is in no query's top-k and is dropped before any selection. Blocks raise it with
// atomicMax and read it back as they go.
__device__ __forceinline__ unsigned long long read_theta(const unsigned long long* theta, int64_t b) {
  return *static_cast<const volatile unsigned long long*>(theta + b);
}

__device__ __forceinline__ bool survives(int64_t key, unsigned long long theta) {
  return key != kNoRow && radix_key(key) >= theta;
}

// Grid (query blocks, spans): block (x, y) scans the tiles of span y -- a contiguous
// range of the chunk's `tiles` tiles from first_tile, about tiles / spans of them -- for
// query block x, keeps each query's best `keep` keys so far in shared memory, and
// writes them as its candidates, cand [B, spans, keep]. keep = k when k <= 512; past
// that a span is one tile, whose 512 rows all fit. Query blocks are the fastest axis:
// the blocks that read one span run together, so its rows cross HBM once and L2 serves
// the rest. A tile offers only its keys at or above the running threshold: once the
// threshold nears the k-th best, most tiles offer none and skip the selection.
// With kTensorCores a block takes 32 queries: each 256-row sub-tile is screened for all
// of them on tensor cores (a staged key serves 32 queries, so L2 serves the keys once
// per 32 queries, not once per 8), and scored in float32, 8 queries at a time, only for
// the groups of 8 the screen lets through: the keys ranked are the float32 scan's, bit
// for bit. Two such blocks fit an SM (128 registers; 64 queries took 228).
template <typename KT, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, kTensorCores ? 2 : 1)
    search_span_kernel(const float* q, const KT* keys, const int64_t* ids, Exclusions ex, int64_t B, int64_t N,
                       int64_t d, bool l2, float slack, int64_t first_tile, int64_t tiles, int64_t k, int64_t keep,
                       int64_t* cand, unsigned long long* theta) {
  constexpr int Q = kTensorCores ? kWideBlock : kQueryBlock, G = TileSmem<Q>::G;
  TileSmem<Q>& sm = *dynamic_smem<TileSmem<Q>>();
  int64_t* best = reinterpret_cast<int64_t*>(&sm + 1);
  int64_t* next = best + Q * keep;
  const int t = threadIdx.x;
  const int64_t spans = gridDim.y, span = blockIdx.y;
  const int64_t first = first_tile + span * tiles / spans, last = first_tile + (span + 1) * tiles / spans;
  for (int64_t B0 = static_cast<int64_t>(blockIdx.x) * Q; B0 < B; B0 += static_cast<int64_t>(gridDim.x) * Q) {
    if (t < Q) sm.kept[t] = 0;
    if (kTensorCores) {  // warp w: slack |q| of queries w, w + 8, ...
      for (int j = t / 32; j < Q; j += kWarps) {
        float sq = 0.0f;
        for (int64_t c = t % 32; B0 + j < B && c < d; c += 32) sq += q[(B0 + j) * d + c] * q[(B0 + j) * d + c];
        sq = warp_sum(sq);
        if (t % 32 == 0) sm.qslack[j] = slack * sqrtf(sq);
      }
    }
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t row0 = tile * kTileRows, rows = N - row0 < kTileRows ? N - row0 : kTileRows;
      if (t < Q) sm.theta[t] = B0 + t < B ? read_theta(theta, B0 + t) : 0;
      if (t < 2 * G) sm.reach[t / G][t % G] = kTensorCores ? 0 : 1;
      __syncthreads();
      if (kTensorCores)
        for (int sub = 0; sub < kTileRows / kThreads; ++sub)
          screen_subtile(q, keys, ids, B, N, d, l2, B0, row0 + sub * kThreads, sub, sm);
      for (int grp = 0; grp < G && B0 + grp * kQueryBlock < B; ++grp) {
        if (!sm.reach[0][grp] && !sm.reach[1][grp]) continue;  // the same for every thread
        const int64_t b0 = B0 + grp * kQueryBlock;
        const int q0 = grp * kQueryBlock;  // the group's first query in the block's arrays
        if (t < kQueryBlock) sm.count[t] = 0;  // read and added to after score_subtile's barriers
        for (int sub = 0; sub < kTileRows / kThreads; ++sub) {
          if (!sm.reach[sub][grp]) continue;
          float acc[kQueryBlock] = {};
          float norm = 0.0f;
          const int64_t local = sub * kThreads + t;
          score_subtile(q, keys, B, N, d, b0, row0 + sub * kThreads, sm, acc, norm);
#pragma unroll
          for (int qi = 0; qi < kQueryBlock; ++qi) {  // unrolled: acc stays in registers
            const int64_t b = b0 + qi, row = row0 + local;
            if (local >= rows || b >= B) continue;
            const int64_t key = pack(l2 ? 2.0f * acc[qi] - norm : acc[qi], row);
            // Exclusions are looked up only for keys that survive the threshold.
            if (survives(key, sm.theta[q0 + qi]) && live(ids, ex, b, row))
              sm.packed[qi][atomicAdd(&sm.count[qi], 1u)] = key;
          }
        }
        __syncthreads();
        for (int qi = 0; qi < kQueryBlock && b0 + qi < B; ++qi) {
          if (sm.count[qi] == 0) continue;  // the same for every thread: read after the barrier
          int64_t *bq = best + (q0 + qi) * keep, *nq = next + (q0 + qi) * keep;
          const int64_t kth =
              block_top(KeySpan{bq, sm.kept[q0 + qi], sm.packed[qi], sm.count[qi]}, keep, nq, sm.select);
          for (int64_t i = t; i < keep; i += kThreads) bq[i] = nq[i];
          if (t == 0) {
            const int64_t kept = sm.kept[q0 + qi] + sm.count[qi];
            sm.kept[q0 + qi] = static_cast<unsigned>(kept < keep ? kept : keep);
            if (kth != kNoRow && keep == k) atomicMax(theta + b0 + qi, radix_key(kth));
          }
          __syncthreads();
        }
        __syncthreads();  // every thread has read count before the next group resets it
      }
      __syncthreads();  // every thread has read reach and kept before the next tile
    }
    for (int qi = 0; qi < Q && B0 + qi < B; ++qi)
      for (int64_t i = t; i < keep; i += kThreads)
        cand[((B0 + qi) * spans + span) * keep + i] = i < sm.kept[qi] ? best[qi * keep + i] : kNoRow;
    __syncthreads();  // kept is reset for the next query block
  }
}

// out[0, k) = the top-k of `span` (unordered, "no row" past the real keys). The keys at
// or above the threshold `th` are gathered first (usually a few times k, out of tiles x
// keep candidates) into `kept` and selected among there; if more than kMergeSmemKeys
// survive, the selection runs over the whole span.
__device__ void merge_top(const KeySpan& span, int64_t k, unsigned long long th, int64_t* kept, unsigned& count,
                          int64_t* out, SelectShared& sh) {
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < span.size(); i += blockDim.x) {
    const int64_t key = span[i];
    if (!survives(key, th)) continue;
    const unsigned at = atomicAdd(&count, 1u);
    if (at < kMergeSmemKeys) kept[at] = key;
  }
  __syncthreads();
  const bool fits = count <= kMergeSmemKeys;
  block_top(fits ? KeySpan{kept, count, nullptr, 0} : span, k, out, sh);
}

// best_out[b] = top-k of best_in[b] (absent when null) and a chunk's candidates, for
// every chunk but the last (whose merge the finish kernel does).
__global__ void __launch_bounds__(kMergeThreads)
    search_merge_kernel(const int64_t* best_in, const int64_t* cand, int64_t per_query, int64_t B, int64_t k,
                        const unsigned long long* theta, int64_t* best_out) {
  __shared__ SelectShared sh;
  __shared__ int64_t kept[kMergeSmemKeys];
  __shared__ unsigned count;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const KeySpan span{best_in ? best_in + b * k : nullptr, best_in ? k : 0, cand + b * per_query, per_query};
    merge_top(span, k, read_theta(theta, b), kept, count, best_out + b * k, sh);
  }
}

// What the finish kernel attends with, for top-k attention in one pass (unused by a
// search).
template <typename KT, typename VT>
struct AttendTail {
  const float* queries;
  const KT* keys;
  const VT* values;
  const int64_t* labels;
  int64_t n, d, width;
  float scale;
  bool l2;
  float* out;
  float* weights;
};

// Per query: the top-k of best_in[b] (absent when null) and the last chunk's candidates
// (absent when null), merged as the merge kernel does, sorted best first into scores
// (may be null) and slots. With kAttend, then the softmax weights and output over those
// rows, as the attend kernel computes them. Dynamic shared memory: merge_top's
// kMergeSmemKeys keys, then the sort's `padded` keys unless `scratch` [B, padded] holds
// them.
template <bool kAttend, typename KT, typename VT>
__global__ void __launch_bounds__(kThreads)
    search_finish_kernel(const int64_t* best_in, const int64_t* cand, int64_t per_query,
                         const unsigned long long* theta, int64_t padded, int64_t* scratch, int64_t B, int64_t k,
                         float* scores, int64_t* slots, AttendTail<KT, VT> tail) {
  __shared__ SelectShared sh;
  __shared__ unsigned count;
  __shared__ float red[32];
  int64_t* kept = dynamic_smem<int64_t>();
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int64_t* x = scratch ? scratch + b * padded : kept + kMergeSmemKeys;
    const KeySpan span{best_in ? best_in + b * k : nullptr, best_in ? k : 0, cand ? cand + b * per_query : nullptr,
                       cand ? per_query : 0};
    merge_top(span, k, read_theta(theta, b), kept, count, x, sh);
    for (int64_t i = k + threadIdx.x; i < padded; i += blockDim.x) x[i] = kNoRow;
    __syncthreads();
    block_sort_desc(x, padded);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      if (scores) scores[b * k + i] = packed_score(x[i]);
      slots[b * k + i] = packed_slot(x[i]);
    }
    __syncthreads();  // the block's writes of slots are visible to it after the barrier
    if constexpr (kAttend)
      attend_query(tail.queries + b * tail.d, tail.keys, tail.values, tail.labels, slots + b * k, tail.n, tail.d, k,
                   tail.width, tail.scale, tail.l2, tail.out + b * tail.width, tail.weights + b * k, red);
  }
}

// Sizes of one search call; the workspace holds cand, then two best buffers (between
// chunks), then the sort scratch, then the thresholds.
struct SearchPlan {
  bool tensor_cores;  // span kernels screen sub-tiles on tensor cores
  int queries;        // per span block
  int64_t keep, tiles, tiles_per_chunk, spans, padded;
  size_t cand_bytes, best_bytes, sort_bytes, theta_bytes, smem;
};

// s such that |TF32 score - float32 score| <= s |q| |k| for d-wide rows: the bound
// kernels/search.py's tf32_slack derives for the Triton screen (2^-9 per product of cut
// operands, d 2^-21 for the float32 sums, twice for l2's 2 q.k, a factor 2 of margin).
float tf32_slack(int64_t d, bool l2) {
  const double bound = 2.0 * (std::ldexp(1.0, -9) + static_cast<double>(d) * std::ldexp(1.0, -21));
  return static_cast<float>(l2 ? 2.0 * bound : bound);
}

// k <= 512: one chunk of every tile, in spans enough to fill the GPU (each span block
// keeps the k best of its rows). Past 512, a span is one tile, and the tiles go in
// chunks whose candidates fit the budget, merged chunk by chunk.
SearchPlan plan_search(int64_t B, int64_t N, int64_t k) {
  SearchPlan p{};
  p.keep = k < kTileRows ? k : kTileRows;
  p.tiles = div_up(N, kTileRows);
  p.tensor_cores = k <= kWideKeep && tensor_cores(B);
  p.queries = p.tensor_cores ? kWideBlock : kQueryBlock;
  const int64_t Bq = B > 0 ? B : 1, fit = kCandidateBudget / (Bq * p.keep);
  const int per_sm = p.tensor_cores ? kWideSpansPerSM : kSpansPerSM;
  int64_t spans = per_sm * device_attribute(cudaDevAttrMultiProcessorCount, 1) / div_up(Bq, p.queries);
  if (spans > fit) spans = fit;
  if (k > kTileRows) spans = fit;  // a span per tile: as many tiles per chunk as fit
  if (spans > p.tiles) spans = p.tiles;
  if (spans > 65535) spans = 65535;  // the grid's y extent
  p.spans = spans > 1 ? spans : 1;
  p.tiles_per_chunk = k > kTileRows ? p.spans : (p.tiles > 0 ? p.tiles : 1);
  p.padded = 1;
  while (p.padded < k) p.padded <<= 1;
  p.cand_bytes = static_cast<size_t>(B * p.spans * p.keep) * sizeof(int64_t);
  p.best_bytes = p.tiles > p.tiles_per_chunk ? static_cast<size_t>(B * k) * sizeof(int64_t) : 0;
  p.sort_bytes = p.padded > kSortSmemKeys ? static_cast<size_t>(B * p.padded) * sizeof(int64_t) : 0;
  p.theta_bytes = static_cast<size_t>(B) * sizeof(unsigned long long);
  p.smem = (p.tensor_cores ? sizeof(TileSmem<kWideBlock>) : sizeof(TileSmem<kQueryBlock>)) +
           2 * static_cast<size_t>(p.queries * p.keep) * sizeof(int64_t);
  return p;
}

}  // namespace

size_t search_workspace_bytes(int64_t batch, int64_t n, int64_t k) {
  const SearchPlan p = plan_search(batch, n, k);
  return p.cand_bytes + 2 * p.best_bytes + p.sort_bytes + p.theta_bytes;
}

namespace {

// Runs a search up to its last step: the threshold's reset, every chunk's span blocks,
// and the merge of every chunk but the last; then finish(grid, smem, best_in, cand,
// per_query, theta, padded, sort_scratch) launches the finish kernel.
template <typename Finish>
cudaError_t scan(const SearchArgs& a, void* workspace, cudaStream_t stream, Finish&& finish) {
  const SearchPlan p = plan_search(a.batch, a.n, a.k);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* cand = reinterpret_cast<int64_t*>(base);
  int64_t* best[2] = {reinterpret_cast<int64_t*>(base + p.cand_bytes),
                      reinterpret_cast<int64_t*>(base + p.cand_bytes + p.best_bytes)};
  auto* sort_scratch = p.sort_bytes ? reinterpret_cast<int64_t*>(base + p.cand_bytes + 2 * p.best_bytes) : nullptr;
  auto* theta = reinterpret_cast<unsigned long long*>(base + p.cand_bytes + 2 * p.best_bytes + p.sort_bytes);
  cudaError_t err = cudaMemsetAsync(theta, 0, p.theta_bytes, stream);
  if (err != cudaSuccess) return err;
  const unsigned query_blocks = grid_size(div_up(a.batch, p.queries), 1 << 30);
  const unsigned per_query_blocks = grid_size(a.batch, 65535);
  int cur = -1;      // best buffer holding the running top-k; none before the first chunk
  int64_t last = 0;  // candidates per query of the last chunk; none when n == 0
  for (int64_t tile = 0; tile < p.tiles; tile += p.tiles_per_chunk) {
    const int64_t nt = p.tiles - tile < p.tiles_per_chunk ? p.tiles - tile : p.tiles_per_chunk;
    const int64_t spans = nt < p.spans ? nt : p.spans;
    err = with_type(a.key_dtype, [&](auto kt) {
      using KT = typename decltype(kt)::type;
      return launch(p.tensor_cores ? search_span_kernel<KT, true> : search_span_kernel<KT, false>,
                    dim3(query_blocks, static_cast<unsigned>(spans)), dim3(kThreads), p.smem, stream, a.queries,
                    static_cast<const KT*>(a.keys), a.slot_ids, a.exclude, a.batch, a.n, a.d, a.l2,
                    tf32_slack(a.d, a.l2), tile, nt, a.k, p.keep, cand, theta);
    });
    if (err != cudaSuccess) return err;
    if (tile + nt >= p.tiles) {
      last = spans * p.keep;
      break;
    }
    const int next = cur == 0 ? 1 : 0;
    err = launch(search_merge_kernel, dim3(per_query_blocks), dim3(kMergeThreads), 0, stream,
                 cur < 0 ? nullptr : best[cur], cand, spans * p.keep, a.batch, a.k, theta, best[next]);
    if (err != cudaSuccess) return err;
    cur = next;
  }
  const size_t smem = (kMergeSmemKeys + (sort_scratch ? 0 : p.padded)) * sizeof(int64_t);
  return finish(dim3(per_query_blocks), smem, cur < 0 ? nullptr : best[cur], last > 0 ? cand : nullptr, last,
                theta, p.padded, sort_scratch);
}

}  // namespace

cudaError_t search(const SearchArgs& a, float* scores, int64_t* slots, void* workspace, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  return scan(a, workspace, stream, [&](dim3 grid, size_t smem, auto... finish) {
    return launch(search_finish_kernel<false, float, float>, grid, dim3(kThreads), smem, stream, finish..., a.batch,
                  a.k, scores, slots, AttendTail<float, float>{});
  });
}

cudaError_t topk_forward(const SearchArgs& a, const Rows& rows, float scale, float* out, int64_t* slots,
                         float* weights, void* workspace, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  return with_row_types(rows, [&](auto kt, auto vt) {
    using KT = typename decltype(kt)::type;
    using VT = typename decltype(vt)::type;
    const AttendTail<KT, VT> tail{a.queries, static_cast<const KT*>(rows.keys), static_cast<const VT*>(rows.values),
                                  rows.labels, rows.n, rows.d, rows.width, scale, a.l2, out, weights};
    return scan(a, workspace, stream, [&](dim3 grid, size_t smem, auto... finish) {
      return launch(search_finish_kernel<true, KT, VT>, grid, dim3(kThreads), smem, stream, finish..., a.batch,
                    a.k, static_cast<float*>(nullptr), slots, tail);
    });
  });
}

}  // namespace cuda
}  // namespace kmem
