// Fused top-k search over the live rows of a memory, on the CPU.
//
// Scores are never stored for more than one key tile: either a streaming pass in which
// each thread scores its own range of rows against every query (small batches: the
// pass is bound by memory bandwidth, so each key row is read once for all queries), or
// a tiled GEMM into a bounded [B, tile] buffer followed by a parallel scan per query
// (large batches: bound by compute, where BLAS is fastest). Both feed per-query TopK
// heaps; dead rows and excluded ids are checked only for rows that beat the heap's
// floor, which after the first few tiles is almost none.
#include "search.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "counters.h"
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

// Offer row `slot` with score `s` to query b's heap, if it is live and not excluded.
inline void offer(TopK& heap, float s, int64_t slot, const int64_t* ids, const Exclusions& ex, int64_t b) {
  if (s > heap.floor() && ids[slot] >= 0 && !ex.contains(b, ids[slot])) heap.push(pack(s, slot));
}

// Best-first slots of the k largest keys among `lists` heaps of k entries each.
void write_slots(const int64_t* heaps, int64_t lists, int64_t k, int64_t* out) {
  std::vector<int64_t> all(heaps, heaps + lists * k);
  std::partial_sort(all.begin(), all.begin() + k, all.end(), std::greater<int64_t>());
  for (int64_t i = 0; i < k; ++i) out[i] = packed_slot(all[i]);
}

template <typename KT>
void stream_search(const float* q, const KT* keys, const int64_t* ids, int64_t B, int64_t N, int64_t d, int64_t k,
                   bool l2, const Exclusions& ex, int64_t* slots_out) {
  const int threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 1024 + 1));
  std::vector<int64_t> heaps(threads * B * k);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int64_t lo = N * t / threads, hi = N * (t + 1) / threads;
    std::vector<TopK> tk;
    tk.reserve(B);
    for (int64_t b = 0; b < B; ++b) tk.emplace_back(heaps.data() + (t * B + b) * k, k);
    for (int64_t j = lo; j < hi; ++j) {
      if (ids[j] < 0) continue;
      const KT* row = keys + j * d;
      const float norm = l2 ? sq_norm(row, d) : 0.f;
      for (int64_t b = 0; b < B; ++b) {
        float s = dot(q + b * d, row, d);
        if (l2) s = 2.f * s - norm;
        offer(tk[b], s, j, ids, ex, b);
      }
    }
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> lists(threads * k);
    for (int64_t b = b0; b < b1; ++b) {
      for (int t = 0; t < threads; ++t)
        std::copy_n(heaps.data() + (t * B + b) * k, k, lists.data() + t * k);
      write_slots(lists.data(), threads, k, slots_out + b * k);
    }
  });
}

void gemm_search(const at::Tensor& queries, const at::Tensor& keys, const int64_t* ids, int64_t k, bool l2,
                 const Exclusions& ex, int64_t* slots_out) {
  const int64_t B = queries.size(0), N = keys.size(0);
  // Bounded scratch: a [B, tile] score block of at most ~16 MiB.
  const int64_t tile = std::clamp<int64_t>((int64_t{4} << 20) / B, 256, 16384);
  at::Tensor scores = at::empty({B, tile}, queries.options());
  std::vector<int64_t> heaps(B * k);
  std::vector<TopK> tk;
  tk.reserve(B);
  for (int64_t b = 0; b < B; ++b) tk.emplace_back(heaps.data() + b * k, k);
  for (int64_t start = 0; start < N; start += tile) {
    const int64_t n = std::min(tile, N - start);
    at::Tensor block = keys.narrow(0, start, n).to(at::kFloat);
    at::Tensor s = scores.narrow(1, 0, n);
    at::mm_out(s, queries, block.t());
    at::Tensor norms;
    if (l2) norms = block.pow(2).sum(1);
    const float* sp = scores.data_ptr<float>();
    const float* np = l2 ? norms.data_ptr<float>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* row = sp + b * tile;
        for (int64_t j = 0; j < n; ++j) {
          const float v = l2 ? 2.f * row[j] - np[j] : row[j];
          offer(tk[b], v, start + j, ids, ex, b);
        }
      }
    });
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) write_slots(heaps.data() + b * k, 1, k, slots_out + b * k);
  });
}

}  // namespace

at::Tensor search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids, int64_t k,
                  bool l2, const c10::optional<at::Tensor>& exclude_ids) {
  TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && slot_ids.device().is_cpu(),
              "search: tensors must be on the CPU");
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1),
              "search: queries [B, d] and keys [N, d] expected");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && slot_ids.dim() == 1 && slot_ids.size(0) == keys.size(0),
              "search: slot_ids must be int64 [N]");
  TORCH_CHECK(k >= 1, "search: k must be >= 1");
  count_call("search");
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
  at::Tensor slots = at::empty({B, k}, slot_ids.options());
  if (B == 0) return slots;
  int64_t* out = slots.data_ptr<int64_t>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  if (B > kStreamMaxBatch) {
    gemm_search(q, kc, idp, k, l2, ex, out);
    return slots;
  }
  AT_DISPATCH_SWITCH(kc.scalar_type(), "kmem_search",
      AT_DISPATCH_CASE(at::kFloat, [&] { stream_search(q.data_ptr<float>(), kc.data_ptr<float>(), idp, B, N, d, k, l2, ex, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { stream_search(q.data_ptr<float>(), kc.data_ptr<at::BFloat16>(), idp, B, N, d, k, l2, ex, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { stream_search(q.data_ptr<float>(), kc.data_ptr<at::Half>(), idp, B, N, d, k, l2, ex, out); }));
  return slots;
}

}  // namespace kmem
