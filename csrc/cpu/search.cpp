// Fused top-k search over the live rows of a memory, on the CPU.
//
// Scores are never stored for more than one key tile: either a streaming pass in which
// each thread scores its own range of rows against every query (small batches: the
// pass is bound by memory bandwidth, so each key row is read once for all queries), or
// a tiled GEMM into a bounded [B, tile] buffer followed by a parallel scan per query
// (large batches: bound by compute, where BLAS is fastest). Both feed per-query TopK
// buffers; dead rows and excluded ids are checked only for rows that beat a query's
// running threshold, which after the first few tiles is almost none.
#include "search.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "topk.h"
#include "vec.h"

namespace kmem {
namespace {

// Ids a query must skip: each row of `sorted` ascending, searched by bisection.
struct Exclusions {
  const int64_t* sorted = nullptr;
  int64_t width = 0;
  bool contains(int64_t b, int64_t id) const {
    if (!width) return false;
    const int64_t* row = sorted + b * width;
    return std::binary_search(row, row + width, id);
  }
};

// Offer row `slot` with score `s` to query b's top-k, if it is live and not excluded.
inline void offer(TopK& top, float s, int64_t slot, const int64_t* ids, const Exclusions& ex, int64_t b) {
  if (s > top.floor() && ids[slot] >= 0 && !ex.contains(b, ids[slot])) top.push(pack(s, slot));
}

// Where a search writes one query's result: its k ranking scores and slots.
struct Result {
  float* scores;
  int64_t* slots;
};

// The k largest keys among `lists` lists of k entries each, best first, into row b of
// `out` (-inf and -1 past the qualifying rows).
void write_best(const int64_t* lists_of_k, int64_t lists, int64_t k, const Result& out, int64_t b) {
  std::vector<int64_t> all(lists_of_k, lists_of_k + lists * k);
  // Select, then sort the k: partial_sort's heap costs twice as much at k = 4096.
  select_top(all.data(), lists * k, k);
  std::sort(all.begin(), all.begin() + k, std::greater<int64_t>());
  for (int64_t i = 0; i < k; ++i) {
    out.scores[b * k + i] = packed_score(all[i]);
    out.slots[b * k + i] = packed_slot(all[i]);
  }
}

// Ranking scores of R consecutive rows for Q queries (q_i = q + i * d) in one pass over
// the rows: R x Q independent vector accumulators, so neither one accumulator's FMA
// latency chain nor the horizontal sums bound the scan (at Q x R = 16 they are one
// transposing reduction); at small B the memory does.
template <int Q, int R, bool L2, typename KT>
inline void block_scores(const float* q, const KT* rows, int64_t d, float (&s)[Q][R]) {
  f32x16 acc[Q * R] = {};
  f32x16 sq[R] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    f32x16 qv[Q];
    for (int a = 0; a < Q; ++a) qv[a] = load16(q + a * d + i);
    for (int r = 0; r < R; ++r) {
      const f32x16 kv = load16(rows + r * d + i);
      for (int a = 0; a < Q; ++a) acc[a * R + r] += qv[a] * kv;
      if (L2) sq[r] += kv * kv;
    }
  }
  if constexpr (Q * R == 16) {
    const f32x16 sums = reduce16(acc);
    std::memcpy(&s[0][0], &sums, sizeof sums);
  } else {
    for (int a = 0; a < Q; ++a)
      for (int r = 0; r < R; ++r) s[a][r] = hsum(acc[a * R + r]);
  }
  float norm[R];
  for (int r = 0; r < R; ++r) norm[r] = L2 ? hsum(sq[r]) : 0.f;
  for (; i < d; ++i) {  // d not a multiple of 16
    for (int r = 0; r < R; ++r) {
      const float x = to_float(rows[r * d + i]);
      if (L2) norm[r] += x * x;
      for (int a = 0; a < Q; ++a) s[a][r] += q[a * d + i] * x;
    }
  }
  if (L2)
    for (int a = 0; a < Q; ++a)
      for (int r = 0; r < R; ++r) s[a][r] = 2.f * s[a][r] - norm[r];
}

// What one thread's scan offers to: queries [B, d] float32, each query's top-k with its
// running threshold (floors[b] == tk[b].floor(), kept in step; +inf past B: see
// thresholds()), the tombstones and the exclusions.
struct Scan {
  const float* q;
  int64_t d, B;
  std::vector<TopK>& tk;
  float* floors;
  const int64_t* ids;
  const Exclusions& ex;
  std::atomic<float>* shared;  // [B]: the highest floor any thread has reached, or null
};

// Every query's running threshold, as Scan::floors wants them (16 more entries, so a
// vector load at any b < B stays inside).
std::vector<float> thresholds(const std::vector<TopK>& tk) {
  std::vector<float> floors((tk.size() + 15) / 16 * 16 + 16, std::numeric_limits<float>::infinity());
  for (size_t b = 0; b < tk.size(); ++b) floors[b] = tk[b].floor();
  return floors;
}

// Offer row `slot` with score `s` to query b if it beats b's threshold, keeping that in
// step. The threshold is this thread's k-th best so far, or just below another thread's
// if that is higher: a row below another thread's k-th best cannot be among the k best
// overall (one equal to it still can, if its slot is lower, so it passes). Threads trade
// their floors only when one rises, every few thousand pushes at large k.
inline void offer_to(const Scan& sc, int64_t b, float s, int64_t slot) {
  if (s <= sc.floors[b]) return;
  TopK& top = sc.tk[b];
  const float before = top.floor();
  offer(top, s, slot, sc.ids, sc.ex, b);
  float floor = top.floor();
  if (sc.shared && floor != before) {
    float seen = sc.shared[b].load(std::memory_order_relaxed);
    while (seen < floor && !sc.shared[b].compare_exchange_weak(seen, floor, std::memory_order_relaxed)) {
    }
    if (seen > floor) floor = std::nextafter(seen, -std::numeric_limits<float>::infinity());
  }
  sc.floors[b] = std::max(sc.floors[b], floor);
}

// The thresholds of queries [b, b + Q) laid out as a Q x R block's scores: lane a R + r
// holds query b + a's.
template <int Q, int R, std::size_t... I>
inline f32x16 block_floors(const float* floors, std::index_sequence<I...>) {
  f32x16 f;
  std::memcpy(&f, floors, sizeof f);
  return __builtin_shufflevector(f, f, static_cast<int>(I / R)...);
}

// Rows [j, j + R) (their keys at `rows`) offered to queries [b, b + Q): nearly every
// score costs one compare with its query's running threshold (the k-th best so far),
// all sixteen of a Q x R = 16 block in one vector compare -- at k = 4096, where many
// scores still pass, a branch per score mispredicted often enough to cost ~1/3 of the
// scan; the top-k buffer sees only the few that beat it.
template <int Q, int R, bool L2, typename KT>
inline void scan_block(const Scan& sc, const KT* rows, int64_t j, int64_t b) {
  float s[Q][R];
  block_scores<Q, R, L2>(sc.q + b * sc.d, rows, sc.d, s);
  if constexpr (Q * R == 16) {
    f32x16 v;
    std::memcpy(&v, s, sizeof v);
    const f32x16 f = block_floors<Q, R>(sc.floors + b, std::make_index_sequence<16>{});
    for (uint32_t m = greater_mask(v, f); m; m &= m - 1) {
      const int i = __builtin_ctz(m);
      offer_to(sc, b + i / R, v[i], j + i % R);
    }
  } else {
    for (int a = 0; a < Q; ++a)
      for (int r = 0; r < R; ++r) offer_to(sc, b + a, s[a][r], j + r);
  }
}

// Row `slot`'s scores `v` for the 16 queries [b0, b0 + 16), offered where they beat
// their running thresholds; one compare answers all 16 for nearly every row.
inline void offer16(const Scan& sc, f32x16 v, int64_t b0, int64_t slot) {
  for (uint32_t m = greater_mask(v, load16(sc.floors + b0)); m; m &= m - 1) {
    const int i = __builtin_ctz(m);
    offer_to(sc, b0 + i, v[i], slot);
  }
}

// Q <= 4 queries [b, b + Q) against the 16 rows [j, j + 16) (float32 keys at `rows`), four
// rows at a time; the 16 rows stay in L1 from one group of queries to the next. Four, not
// 16 / Q: at B < 4 the group is the first to read the rows, and sixteen interleaved rows
// (a 1 x 16 block) made B = 1 12% slower (79 vs 69.5 ms at 1.28M x 256).
template <int Q, bool L2>
inline void scan_16(const Scan& sc, const float* rows, int64_t j, int64_t b) {
  for (int64_t r = 0; r < 16; r += 4) scan_block<Q, 4, L2>(sc, rows + r * sc.d, j + r, b);
}

// Requests every cache line of `bytes` at `p` (a no-op for bytes <= 0): a scan block's
// reads alone reach the memory a few lines at a time, stalling at each 4 KB page (where
// the hardware prefetcher stops and a TLB miss starts).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// From this many queries on, the scan requests the next block's lines spread over its
// groups of queries, so they arrive under the arithmetic; fewer leave too little
// arithmetic to spread over and request the current block's at once (whose 64 requests
// stall on the line-fill buffers, but less than the reads would alone). Not at B = 1:
// four interleaved row streams the hardware prefetcher keeps ahead of. At 1.28M x 256
// float32: B = 1 66 ms either way (68-71 at once), B = 4 99 -> 75 ms at once, B = 16
// 130 -> 112 at once (118 spread), B = 48 207 -> 180 spread, B = 64 274 -> 252 at once,
// -> 222 spread.
constexpr int64_t kSpreadPrefetchBatch = 32;

// Rows [lo, hi): blocks of 16 rows for groups of 4, 2 and 1 queries, keys stored
// narrower than float32 converted once per block (not once per group of queries: that
// made bf16 keys slower than float32 at B = 64); the last < 16 rows one at a time.
template <bool L2, typename KT>
void scan_range(const Scan& sc, const KT* keys, int64_t lo, int64_t hi) {
  const int64_t d = sc.d, block_bytes = 16 * d * int64_t{sizeof(KT)};
  const bool spread = sc.B >= kSpreadPrefetchBatch;
  const int64_t groups = std::max<int64_t>(1, sc.B / 4);
  const int64_t share = (block_bytes / 64 + groups - 1) / groups * 64;  // bytes per group of queries
  std::vector<float> tile(std::is_same_v<KT, float> ? 0 : 16 * d);
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    if (sc.B > 1 && (!spread || j == lo)) prefetch(keys + j * d, block_bytes);
    const char* next = spread && j + 32 <= hi ? reinterpret_cast<const char*>(keys + (j + 16) * d) : nullptr;
    const float* rows;
    if constexpr (std::is_same_v<KT, float>) {
      rows = keys + j * d;
    } else {
      for (int64_t i = 0; i < 16 * d; i += 16) {
        const f32x16 v = load16(keys + j * d + i);
        std::memcpy(tile.data() + i, &v, sizeof v);
      }
      rows = tile.data();
    }
    int64_t b = 0;
    for (int64_t g = 0; b + 4 <= sc.B; b += 4, ++g) {
      if (next) prefetch(next + g * share, std::min(share, block_bytes - g * share));
      scan_16<4, L2>(sc, rows, j, b);
    }
    if (b + 2 <= sc.B) {
      scan_16<2, L2>(sc, rows, j, b);
      b += 2;
    }
    if (b < sc.B) scan_16<1, L2>(sc, rows, j, b);
  }
  for (; j < hi; ++j)
    for (int64_t b = 0; b < sc.B; ++b) scan_block<1, 1, L2>(sc, keys + j * d, j, b);
}

#ifdef KMEM_AMX
// Rows [lo, hi) of bfloat16 keys scored by AMX tiles (amx.h), 32 rows at a time, the
// last < 32 through a zero-padded copy. As in scan_range, nearly every score costs one
// compare with its query's running threshold -- here 16 queries' in one instruction.
template <bool L2>
void amx_scan_range(const Scan& sc, const amx::Queries& qs, const at::BFloat16* keys, int64_t lo, int64_t hi) {
  constexpr int64_t kBlock = 2 * amx::kRows;
  const amx::Tiles tiles;
  const int64_t d = sc.d;
  alignas(64) float s[kBlock][amx::kMaxGroups * 16];
  std::vector<at::BFloat16> tail;
  for (int64_t j = lo; j < hi; j += kBlock) {
    const int64_t rows = std::min<int64_t>(kBlock, hi - j);
    const at::BFloat16* block = keys + j * d;
    if (rows < kBlock) {
      tail.assign(kBlock * d, at::BFloat16(0.f));
      std::copy_n(block, rows * d, tail.begin());
      block = tail.data();
    }
    prefetch(block, kBlock * d * int64_t{sizeof(at::BFloat16)});  // bf16 B = 64: 120 -> 95 ms
    amx::scores32(qs, block, d, &s[0][0]);
    for (int64_t r = 0; r < rows; ++r) {
      const float norm = L2 ? sq_norm(block + r * d, d) : 0.f;
      for (int64_t g = 0; g < qs.groups(); ++g) {
        const f32x16 v = load16(&s[r][g * 16]);
        offer16(sc, L2 ? 2.f * v - norm : v, g * 16, j + r);
      }
    }
  }
}
#endif

// One thread's rows [lo, hi): by AMX tiles when `packed` holds the queries (bfloat16
// keys on a CPU with AMX), else by the vector scan.
template <bool L2, typename KT>
void scan_rows(const Scan& sc, const amx::Queries* packed, const KT* keys, int64_t lo, int64_t hi) {
#ifdef KMEM_AMX
  if constexpr (std::is_same_v<KT, at::BFloat16>) {
    if (packed) return amx_scan_range<L2>(sc, *packed, keys, lo, hi);
  }
#endif
  scan_range<L2>(sc, keys, lo, hi);
}

template <typename KT>
void stream_search(const float* q, const KT* keys, const int64_t* ids, int64_t B, int64_t N, int64_t d, int64_t k,
                   bool l2, const Exclusions& ex, const Result& out) {
  const int threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 1024 + 1));
  std::vector<int64_t> tops(threads * B * k);
  std::vector<std::atomic<float>> shared(threads > 1 ? B : 0);
  for (auto& f : shared) f.store(-std::numeric_limits<float>::infinity(), std::memory_order_relaxed);
  std::optional<amx::Queries> amx_queries;
#ifdef KMEM_AMX
  if constexpr (std::is_same_v<KT, at::BFloat16>)
    if (d % amx::kDims == 0 && amx::available()) amx_queries.emplace(q, B, d);
#endif
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int64_t lo = N * t / threads, hi = N * (t + 1) / threads;
    std::vector<TopK> tk;
    tk.reserve(B);
    for (int64_t b = 0; b < B; ++b) tk.emplace_back(tops.data() + (t * B + b) * k, k);
    // Dead rows are scored too (a branch per row would cost more than the few dead
    // rows do); offer() drops them, and only if they would have entered the top-k.
    std::vector<float> floors = thresholds(tk);
    const Scan sc{q, d, B, tk, floors.data(), ids, ex, shared.empty() ? nullptr : shared.data()};
    const amx::Queries* packed = amx_queries ? &*amx_queries : nullptr;
    if (l2)
      scan_rows<true>(sc, packed, keys, lo, hi);
    else
      scan_rows<false>(sc, packed, keys, lo, hi);
    for (TopK& t : tk) t.finish();
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> lists(threads * k);
    for (int64_t b = b0; b < b1; ++b) {
      for (int t = 0; t < threads; ++t)
        std::copy_n(tops.data() + (t * B + b) * k, k, lists.data() + t * k);
      write_best(lists.data(), threads, k, out, b);
    }
  });
}

// Fills scores [B, n] (row stride ld) for the key rows [start, start + n), and their
// squared norms when the metric is l2.
using TileScorer = std::function<void(int64_t start, int64_t n, float* scores, int64_t ld, float* norms)>;

// A tile scorer whose scores are approximate -- bf16-rounded queries -- is followed by
// this: a row whose approximate score comes within the error bound (slack[b] * ||k||) of
// query b's floor is scored again with the float32 query and offered with that score,
// so the ranking is the float32 one; the rest (nearly all, once the floors settle)
// cannot reach the top k.
struct Rescore {
  const float* q;  // [B, d] float32
  const at::BFloat16* keys;  // [N, d]
  int64_t d;
  std::vector<float> slack;  // [B]: bound per unit of ||k||
  float absolute;  // what products flushed below float32's normal range may lose
};

// Scores tile after tile into a bounded buffer, then offers each query's row of it to
// that query's top-k (parallel over queries); through `rescore` if the scores are approximate.
void tiled_search(int64_t B, int64_t N, int64_t k, bool l2, const int64_t* ids, const Exclusions& ex,
                  const TileScorer& score_tile, const Result& out, const Rescore* rescore = nullptr) {
  // Bounded scratch: a [B, tile] score block of at most ~16 MiB.
  const int64_t tile = std::clamp<int64_t>((int64_t{4} << 20) / B, 256, 16384);
  std::vector<float> scores(B * tile), norms(l2 || rescore ? tile : 0), knorm(rescore ? tile : 0);
  std::vector<int64_t> tops(B * k);
  std::vector<TopK> tk;
  tk.reserve(B);
  for (int64_t b = 0; b < B; ++b) tk.emplace_back(tops.data() + b * k, k);
  for (int64_t start = 0; start < N; start += tile) {
    const int64_t n = std::min(tile, N - start);
    score_tile(start, n, scores.data(), tile, norms.empty() ? nullptr : norms.data());
    for (int64_t j = 0; j < static_cast<int64_t>(knorm.size()) && j < n; ++j) knorm[j] = std::sqrt(norms[j]);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* row = scores.data() + b * tile;
        const float slack = rescore ? rescore->slack[b] : 0.f, absolute = rescore ? rescore->absolute : 0.f;
        // Row j, whose tile score is s, to query b's top-k.
        auto take = [&](int64_t j, float s) {
          if (!rescore) return offer(tk[b], s, start + j, ids, ex, b);
          // Written as "below" so that a NaN bound is rescored too.
          if (s + (slack * knorm[j] + absolute) < tk[b].floor()) return;
          const int64_t d = rescore->d;
          const float exact = dot(rescore->q + b * d, rescore->keys + (start + j) * d, d);
          offer(tk[b], l2 ? 2.f * exact - norms[j] : exact, start + j, ids, ex, b);
        };
        // Sixteen scores (and their bounds) against the floor in one compare; the floor
        // may rise within the sixteen, which take() and offer() see.
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
          f32x16 v = load16(row + j);
          if (l2) v = 2.f * v - load16(norms.data() + j);
          const f32x16 reach = rescore ? v + (slack * load16(knorm.data() + j) + absolute) : v;
          const f32x16 floor = f32x16{} + tk[b].floor();
          for (uint32_t m = reach_mask(reach, floor); m; m &= m - 1) {
            const int i = __builtin_ctz(m);
            take(j + i, v[i]);
          }
        }
        for (; j < n; ++j) take(j, l2 ? 2.f * row[j] - norms[j] : row[j]);
      }
    });
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      tk[b].finish();
      write_best(tops.data() + b * k, 1, k, out, b);
    }
  });
}

// Any key dtype: the tile as float32, scored by BLAS.
TileScorer blas_scorer(const at::Tensor& queries, const at::Tensor& keys) {
  return [&queries, &keys](int64_t start, int64_t n, float* scores, int64_t ld, float* norms) {
    const at::Tensor block = keys.narrow(0, start, n).to(at::kFloat);
    at::Tensor out = at::from_blob(scores, {queries.size(0), n}, {ld, 1}, queries.options());
    at::mm_out(out, queries, block.t());
    if (norms) {
      const at::Tensor sq = block.pow(2).sum(1);
      std::copy_n(sq.data_ptr<float>(), n, norms);
    }
  };
}

#if defined(__AVX512BF16__)
// bfloat16 keys on AVX512-BF16: vdpbf16ps multiplies bf16 pairs and accumulates in
// float32 at twice the FMA rate, with keys read at half the bytes. A block of 32 keys
// is transposed ("VNNI" layout: for each pair of dimensions, the pair of every key)
// into a thread-local buffer, so each instruction yields 16 keys' partial scores for a
// broadcast query pair and no horizontal sums are needed. Queries are rounded to bf16:
// the scores screen rows for an exact float32 rescore (Rescore).
template <int QN>
void bf16_block(const uint32_t* qpairs, int64_t pairs, const uint32_t* packed, float* scores, int64_t ld,
                int64_t rows) {
  __m512 acc[QN][2];
  for (int i = 0; i < QN; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_load_si512(packed + p * 32);
    const __m512bh k1 = (__m512bh)_mm512_load_si512(packed + p * 32 + 16);
    for (int i = 0; i < QN; ++i) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(qpairs[i * pairs + p]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], k0, q);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], k1, q);
    }
  }
  const __mmask16 m0 = rows >= 16 ? 0xFFFF : (1u << rows) - 1;
  const __mmask16 m1 = rows >= 32 ? 0xFFFF : rows <= 16 ? 0 : (1u << (rows - 16)) - 1;
  for (int i = 0; i < QN; ++i) {
    _mm512_mask_storeu_ps(scores + i * ld, m0, acc[i][0]);
    _mm512_mask_storeu_ps(scores + i * ld + 16, m1, acc[i][1]);
  }
}

TileScorer bf16_scorer(const at::Tensor& queries_bf16, const at::Tensor& keys) {
  return [&queries_bf16, &keys](int64_t start, int64_t n, float* scores, int64_t ld, float* norms) {
    const int64_t B = queries_bf16.size(0), d = keys.size(1), pairs = d / 2;
    const auto* qpairs = reinterpret_cast<const uint32_t*>(queries_bf16.data_ptr<at::BFloat16>());
    const auto* base = keys.data_ptr<at::BFloat16>() + start * d;
    at::parallel_for(0, (n + 31) / 32, 1, [&](int64_t kb0, int64_t kb1) {
      auto* packed = static_cast<uint32_t*>(std::aligned_alloc(64, pairs * 32 * sizeof(uint32_t)));
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t rows = std::min<int64_t>(32, n - kb * 32);
        for (int64_t l = 0; l < 32; ++l) {
          const auto* row = reinterpret_cast<const uint32_t*>(base + (kb * 32 + std::min(l, rows - 1)) * d);
          for (int64_t p = 0; p < pairs; ++p) packed[p * 32 + l] = l < rows ? row[p] : 0u;
          if (norms && l < rows) norms[kb * 32 + l] = sq_norm(base + (kb * 32 + l) * d, d);
        }
        for (int64_t qb = 0; qb < B; qb += 8) {
          const uint32_t* qp = qpairs + qb * pairs;
          float* out = scores + qb * ld + kb * 32;
          switch (std::min<int64_t>(8, B - qb)) {
            case 8: bf16_block<8>(qp, pairs, packed, out, ld, rows); break;
            case 7: bf16_block<7>(qp, pairs, packed, out, ld, rows); break;
            case 6: bf16_block<6>(qp, pairs, packed, out, ld, rows); break;
            case 5: bf16_block<5>(qp, pairs, packed, out, ld, rows); break;
            case 4: bf16_block<4>(qp, pairs, packed, out, ld, rows); break;
            case 3: bf16_block<3>(qp, pairs, packed, out, ld, rows); break;
            case 2: bf16_block<2>(qp, pairs, packed, out, ld, rows); break;
            default: bf16_block<1>(qp, pairs, packed, out, ld, rows); break;
          }
        }
      }
      std::free(packed);
    });
  };
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids, int64_t k,
                  bool l2, const c10::optional<at::Tensor>& exclude_ids) {
  TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && slot_ids.device().is_cpu(),
              "search: tensors must be on the CPU");
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1),
              "search: queries [B, d] and keys [N, d] expected");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && slot_ids.dim() == 1 && slot_ids.size(0) == keys.size(0),
              "search: slot_ids must be int64 [N]");
  TORCH_CHECK(k >= 1, "search: k must be >= 1");
  const at::Tensor q = queries.to(at::kFloat).contiguous();
  const at::Tensor kc = keys.contiguous();
  const at::Tensor ids = slot_ids.contiguous();
  const int64_t B = q.size(0), N = kc.size(0), d = q.size(1);
  at::Tensor sorted;
  Exclusions ex;
  if (exclude_ids.has_value() && exclude_ids->numel() > 0) {
    TORCH_CHECK(exclude_ids->scalar_type() == at::kLong && exclude_ids->dim() == 2 && exclude_ids->size(0) == B,
                "search: exclude_ids must be int64 [B, E]");
    sorted = std::get<0>(exclude_ids->sort(1)).contiguous();
    ex = {sorted.data_ptr<int64_t>(), sorted.size(1)};
  }
  at::Tensor scores = at::empty({B, k}, q.options());
  at::Tensor slots = at::empty({B, k}, slot_ids.options());
  const Result out{scores.data_ptr<float>(), slots.data_ptr<int64_t>()};
  if (B == 0) return {scores, slots};
  const int64_t* idp = ids.data_ptr<int64_t>();
#if defined(__AVX512BF16__)
  if (kc.scalar_type() == at::kBFloat16 && d % 2 == 0 && B > kStreamMaxBatch) {
    // Scored with bf16-rounded queries, each query off by under 2^-8 of itself, so a
    // score by under 2^-8 ||q|| ||k||, plus float32 summation (d 2^-24 each, two sums);
    // doubled for margin, and again for l2's 2 q.k. Products below float32's normal
    // range may be flushed: d 2^-120 absolute covers them.
    const at::Tensor qb = q.to(at::kBFloat16).contiguous();
    Rescore rescore{q.data_ptr<float>(), kc.data_ptr<at::BFloat16>(), d, std::vector<float>(B),
                    static_cast<float>(d) * std::ldexp(1.f, -120)};
    const float unit = (l2 ? 4.f : 2.f) * (std::ldexp(1.f, -8) + static_cast<float>(d) * std::ldexp(1.f, -23));
    for (int64_t b = 0; b < B; ++b) rescore.slack[b] = unit * std::sqrt(sq_norm(rescore.q + b * d, d));
    tiled_search(B, N, k, l2, idp, ex, bf16_scorer(qb, kc), out, &rescore);
    return {scores, slots};
  }
#endif
  if (B > kStreamMaxBatch) {
    tiled_search(B, N, k, l2, idp, ex, blas_scorer(q, kc), out);
    return {scores, slots};
  }
  const float* qp = q.data_ptr<float>();
  AT_DISPATCH_SWITCH(kc.scalar_type(), "kmem_search",
      AT_DISPATCH_CASE(at::kFloat, [&] { stream_search(qp, kc.data_ptr<float>(), idp, B, N, d, k, l2, ex, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { stream_search(qp, kc.data_ptr<at::BFloat16>(), idp, B, N, d, k, l2, ex, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { stream_search(qp, kc.data_ptr<at::Half>(), idp, B, N, d, k, l2, ex, out); }));
  return {scores, slots};
}

}  // namespace kmem
