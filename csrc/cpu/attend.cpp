// Attention once the rows are chosen: top-k (gathered rows) and dense (all rows).
//
// Top-k touches only B*k rows, so it runs as plain loops parallel over queries, never
// gathering [B, k, d] copies. Its backward scatters into dkeys/dvalues with each
// thread owning a band of columns, so queries that share a row never race.
// Dense attention streams over key tiles like flash attention: a bounded [B, tile]
// block of scores, an online softmax forward, and a backward that recomputes each
// tile's weights from the saved log-sum-exp instead of keeping them.
#include "attend.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vec.h"

namespace kmem {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_cpu(std::initializer_list<const at::Tensor*> ts, const char* op) {
  for (const at::Tensor* t : ts) TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU");
}

// ---------------------------------------------------------------------- top-k
// Scaled scores of query `qb` [d] against rows `sb` [k] of the keys (-1: no row, -inf)
// into wb [k]; returns the largest. Four gathered rows at a time: one at a time, each
// row's reads waited on the last's (k = 4096, B = 64 at 1.28M x 256: 45 -> 27 ms).
template <typename KT>
float gathered_scores(const float* qb, const KT* keys, const int64_t* sb, int64_t k, int64_t d, float scale, bool l2,
                      float* wb) {
  constexpr int R = 4;
  float top = kNegInf;
  for (int64_t j0 = 0; j0 < k; j0 += R) {
    const int n = static_cast<int>(std::min<int64_t>(R, k - j0));
    const KT* rows[R] = {};
    const KT* any = nullptr;
    for (int r = 0; r < n; ++r)
      if (sb[j0 + r] >= 0) any = rows[r] = keys + sb[j0 + r] * d;
    float s[R] = {};
    if (any) {
      for (const KT*& row : rows) row = row ? row : any;  // a stand-in, its score unused
      if (l2)
        row_scores<R, true>(qb, rows, d, s);
      else
        row_scores<R, false>(qb, rows, d, s);
    }
    for (int r = 0; r < n; ++r) {
      float& wj = wb[j0 + r];
      wj = sb[j0 + r] < 0 ? kNegInf : scale * (l2 ? -s[r] : s[r]);
      top = std::max(top, wj);
    }
  }
  return top;
}

template <typename KT, typename VT>
void topk_forward(const float* q, const KT* keys, const VT* values, const int64_t* labels, const int64_t* slots,
                  int64_t B, int64_t d, int64_t k, int64_t W, float scale, bool l2, float* out, float* w) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* qb = q + b * d;
      const int64_t* sb = slots + b * k;
      float* wb = w + b * k;
      const float top = gathered_scores(qb, keys, sb, k, d, scale, l2, wb);
      float* ob = out + b * W;
      if (top == kNegInf) {  // no row: zero weights, zero output
        std::fill_n(wb, k, 0.f);
        continue;
      }
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) total += (wb[j] = sb[j] < 0 ? 0.f : std::exp(wb[j] - top));
      for (int64_t j = 0; j < k; ++j) {
        wb[j] /= total;
        if (sb[j] < 0) continue;
        if (labels) ob[labels[sb[j]]] += wb[j];
        else axpy(ob, wb[j], values + sb[j] * W, W);
      }
    }
  });
}

template <typename KT, typename VT>
void topk_backward(const float* g, const float* q, const KT* keys, const VT* values, const int64_t* labels,
                   const int64_t* slots, const float* w, int64_t B, int64_t d, int64_t k, int64_t W, float scale,
                   bool l2, bool per_retrieval, float* dq, float* ds, float* dkeys, float* dvalues) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* gb = g + b * W;
      const float* qb = q + b * d;
      const float* wb = w + b * k;
      const int64_t* sb = slots + b * k;
      float* dsb = ds + b * k;
      float mean = 0.f;  // sum_j w_j dw_j
      for (int64_t j = 0; j < k; ++j) {
        if (sb[j] < 0) {
          dsb[j] = 0.f;
          continue;
        }
        dsb[j] = labels ? gb[labels[sb[j]]] : dot(gb, values + sb[j] * W, W);  // dw_j for now
        mean += wb[j] * dsb[j];
      }
      float* dqb = dq + b * d;
      float total = 0.f;  // sum_j ds_j, for the l2 term
      for (int64_t j = 0; j < k; ++j) {
        if (sb[j] < 0) continue;
        dsb[j] = scale * wb[j] * (dsb[j] - mean);
        total += dsb[j];
        axpy(dqb, l2 ? 2.f * dsb[j] : dsb[j], keys + sb[j] * d, d);
      }
      if (l2) {
        for (int64_t i = 0; i < d; ++i) dqb[i] -= 2.f * total * qb[i];
      }
    }
  });
  if (!dkeys && !dvalues) return;
  // Column bands: a band's columns of every row belong to one thread.
  const int64_t band = 16;
  const int64_t width = std::max(dkeys ? d : 0, dvalues ? W : 0);
  at::parallel_for(0, (width + band - 1) / band, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = slots[b * k + j];
        if (slot < 0) continue;
        const int64_t row = per_retrieval ? b * k + j : slot;  // the gradient row this retrieval adds to
        const float dsv = ds[b * k + j], wv = w[b * k + j];
        for (int64_t c = c0 * band; c < std::min(c1 * band, width); ++c) {
          if (dkeys && c < d) {
            const float qc = q[b * d + c];
            dkeys[row * d + c] += l2 ? 2.f * dsv * (qc - to_float(keys[slot * d + c])) : dsv * qc;
          }
          if (dvalues && c < W) dvalues[row * W + c] += wv * g[b * W + c];
        }
      }
    }
  });
}

// Dispatch over one row storage dtype.
template <typename F>
void with_row_type(at::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "kmem: ", what, " must be float32, bfloat16 or float16, not ", type);
  }
}

// Dispatch over the (keys, vector values) storage dtypes; label values are int64 and
// take the keys' type as a placeholder.
template <typename F>
void with_row_types(const at::Tensor& keys, const at::Tensor& values, int64_t num_classes, F&& f) {
  with_row_type(keys.scalar_type(), "keys", [&](auto key_tag) {
    if (num_classes) return f(key_tag, key_tag);
    with_row_type(values.scalar_type(), "values", [&](auto value_tag) { f(key_tag, value_tag); });
  });
}

// ---------------------------------------------------------------------- dense
// (query, slot) pairs to mask: the slots holding each query's excluded ids, by slot.
std::vector<std::pair<int64_t, int64_t>> excluded_pairs(const at::Tensor& slot_ids,
                                                        const c10::optional<at::Tensor>& exclude_ids) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  if (!exclude_ids.has_value() || exclude_ids->numel() == 0) return pairs;
  const at::Tensor ex = exclude_ids->contiguous();
  std::unordered_map<int64_t, std::vector<int64_t>> who;  // id -> queries excluding it
  const int64_t* e = ex.data_ptr<int64_t>();
  for (int64_t b = 0; b < ex.size(0); ++b)
    for (int64_t i = 0; i < ex.size(1); ++i)
      if (e[b * ex.size(1) + i] >= 0) who[e[b * ex.size(1) + i]].push_back(b);
  const int64_t* ids = slot_ids.data_ptr<int64_t>();
  for (int64_t j = 0; j < slot_ids.size(0); ++j) {
    if (ids[j] < 0) continue;
    auto it = who.find(ids[j]);
    if (it != who.end())
      for (int64_t b : it->second) pairs.emplace_back(j, b);
  }
  return pairs;
}

struct DenseTiles {
  at::Tensor q, keys, values, slot_ids;
  std::vector<std::pair<int64_t, int64_t>> excluded;
  float scale;
  bool l2;
  int64_t num_classes, tile;

  // Logits scale * score [B, n] of rows [start, start + n), dead and excluded at -inf;
  // also the tile's keys, both in the working dtype (q's).
  std::pair<at::Tensor, at::Tensor> logits(int64_t start, int64_t n) const {
    at::Tensor kt = keys.narrow(0, start, n).to(q.scalar_type());
    at::Tensor s = at::mm(q, kt.t());
    if (l2) s = 2 * s - kt.pow(2).sum(1).unsqueeze(0) - q.pow(2).sum(1, true);
    s.mul_(scale);
    s.masked_fill_(slot_ids.narrow(0, start, n).lt(0).unsqueeze(0), kNegInf);
    auto first = std::lower_bound(excluded.begin(), excluded.end(), std::make_pair(start, int64_t{-1}));
    std::vector<int64_t> rows, cols;
    for (auto it = first; it != excluded.end() && it->first < start + n; ++it) {
      rows.push_back(it->second);
      cols.push_back(it->first - start);
    }
    if (!rows.empty()) {
      const auto opts = at::TensorOptions().dtype(at::kLong);
      s.index_put_({at::tensor(rows, opts), at::tensor(cols, opts)}, kNegInf);
    }
    return {s, kt};
  }
  // Rows [start, start + n) of the values, in the working dtype (vector values only).
  at::Tensor value_rows(int64_t start, int64_t n) const { return values.narrow(0, start, n).to(q.scalar_type()); }
  // p [B, n] @ (values of rows [start, start + n)) -> [B, W]
  at::Tensor weigh(const at::Tensor& p, int64_t start, int64_t n) const {
    if (!num_classes) return at::mm(p, value_rows(start, n));
    return at::zeros({p.size(0), num_classes}, p.options()).index_add_(1, values.narrow(0, start, n), p);
  }
};

DenseTiles make_tiles(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                      const at::Tensor& slot_ids, const c10::optional<at::Tensor>& exclude_ids, double scale, bool l2,
                      int64_t num_classes) {
  check_cpu({&queries, &keys, &values, &slot_ids}, "dense attention");
  const int64_t B = std::max<int64_t>(queries.size(0), 1);
  // float32 work, float64 when an input is (gradcheck).
  const bool wide = queries.scalar_type() == at::kDouble || keys.scalar_type() == at::kDouble;
  return {queries.to(wide ? at::kDouble : at::kFloat).contiguous(),
          keys.contiguous(),
          values.contiguous(),
          slot_ids.contiguous(),
          excluded_pairs(slot_ids.contiguous(), exclude_ids),
          static_cast<float>(scale),
          l2,
          num_classes,
          std::clamp<int64_t>((int64_t{4} << 20) / B, 256, 16384)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attend_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                  const at::Tensor& values, const at::Tensor& slots, double scale,
                                                  bool l2, int64_t num_classes) {
  check_cpu({&queries, &keys, &values, &slots}, "attend_forward");
  const at::Tensor q = queries.to(at::kFloat).contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const at::Tensor sc = slots.contiguous();
  const int64_t B = q.size(0), d = q.size(1), k = sc.size(1), W = num_classes ? num_classes : vc.size(1);
  at::Tensor out = at::zeros({B, W}, q.options()), w = at::empty({B, k}, q.options());
  with_row_types(kc, vc, num_classes, [&](auto key_tag, auto value_tag) {
    using T = decltype(key_tag);
    using V = decltype(value_tag);
    topk_forward<T, V>(q.data_ptr<float>(), kc.data_ptr<T>(), num_classes ? nullptr : vc.data_ptr<V>(),
                       num_classes ? vc.data_ptr<int64_t>() : nullptr, sc.data_ptr<int64_t>(), B, d, k, W,
                       static_cast<float>(scale), l2, out.data_ptr<float>(), w.data_ptr<float>());
  });
  return {out, w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attend_backward(const at::Tensor& grad_out, const at::Tensor& queries,
                                                               const at::Tensor& keys, const at::Tensor& values,
                                                               const at::Tensor& slots, const at::Tensor& weights,
                                                               double scale, bool l2, int64_t num_classes,
                                                               bool needs_keys, bool needs_values,
                                                               bool per_retrieval) {
  check_cpu({&grad_out, &queries, &keys, &values, &slots, &weights}, "attend_backward");
  const at::Tensor g = grad_out.to(at::kFloat).contiguous(), q = queries.to(at::kFloat).contiguous();
  const at::Tensor kc = keys.contiguous(), vc = values.contiguous(), sc = slots.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), d = q.size(1), k = sc.size(1), W = g.size(1);
  at::Tensor dq = at::zeros({B, d}, q.options()), ds = at::empty({B, k}, q.options());
  const int64_t rows = per_retrieval ? B * k : kc.size(0);  // gradient rows
  at::Tensor dkeys = needs_keys ? at::zeros({rows, d}, q.options()) : at::Tensor();
  at::Tensor dvalues = needs_values && !num_classes ? at::zeros({rows, W}, q.options()) : at::Tensor();
  with_row_types(kc, vc, num_classes, [&](auto key_tag, auto value_tag) {
    using T = decltype(key_tag);
    using V = decltype(value_tag);
    topk_backward<T, V>(g.data_ptr<float>(), q.data_ptr<float>(), kc.data_ptr<T>(),
                        num_classes ? nullptr : vc.data_ptr<V>(), num_classes ? vc.data_ptr<int64_t>() : nullptr,
                        sc.data_ptr<int64_t>(), w.data_ptr<float>(), B, d, k, W, static_cast<float>(scale), l2,
                        per_retrieval, dq.data_ptr<float>(), ds.data_ptr<float>(), dkeys.defined() ? dkeys.data_ptr<float>() : nullptr,
                        dvalues.defined() ? dvalues.data_ptr<float>() : nullptr);
  });
  return {dq, dkeys.defined() ? dkeys : at::empty({0}, q.options()),
          dvalues.defined() ? dvalues : at::empty({0}, q.options())};
}

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                 const at::Tensor& values, const at::Tensor& slot_ids,
                                                 const c10::optional<at::Tensor>& exclude_ids, double scale, bool l2,
                                                 int64_t num_classes) {
  const DenseTiles t = make_tiles(queries, keys, values, slot_ids, exclude_ids, scale, l2, num_classes);
  const int64_t B = t.q.size(0), N = t.keys.size(0), W = num_classes ? num_classes : t.values.size(1);
  at::Tensor run_max = at::full({B, 1}, kNegInf, t.q.options()), total = at::zeros({B, 1}, t.q.options());
  at::Tensor acc = at::zeros({B, W}, t.q.options());
  for (int64_t start = 0; start < N; start += t.tile) {
    const int64_t n = std::min(t.tile, N - start);
    at::Tensor z = t.logits(start, n).first;
    at::Tensor new_max = at::maximum(run_max, std::get<0>(z.max(1, true)));
    at::Tensor shift = at::where(new_max.isfinite(), new_max, at::zeros_like(new_max));
    at::Tensor p = (z - shift).exp_();
    at::Tensor rescale = (run_max - shift).exp_();
    acc.mul_(rescale).add_(t.weigh(p, start, n));
    total.mul_(rescale).add_(p.sum(1, true));
    run_max = new_max;
  }
  at::Tensor has = total.gt(0);
  at::Tensor out = acc / at::where(has, total, at::ones_like(total));
  at::Tensor lse = at::where(has, run_max + total.log(), at::full_like(total, kNegInf)).squeeze(1);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_out, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& slot_ids, const c10::optional<at::Tensor>& exclude_ids, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_lse, double scale, bool l2, int64_t num_classes, bool needs_keys,
    bool needs_values) {
  const DenseTiles t = make_tiles(queries, keys, values, slot_ids, exclude_ids, scale, l2, num_classes);
  const int64_t B = t.q.size(0), N = t.keys.size(0), d = t.q.size(1);
  const at::ScalarType work = t.q.scalar_type();
  const at::Tensor g = grad_out.to(work).contiguous();
  // sum_j p_j dp_j, less what reaches lse: d lse / d z_j = p_j.
  const at::Tensor g_out = (g * out.to(work)).sum(1, true) - grad_lse.to(work).unsqueeze(1);
  const at::Tensor shift = at::where(lse.isfinite(), lse, at::zeros_like(lse)).to(work).unsqueeze(1);
  at::Tensor dq = at::zeros({B, d}, t.q.options());
  at::Tensor dkeys = needs_keys ? at::zeros({N, d}, t.q.options()) : at::empty({0}, t.q.options());
  const bool want_values = needs_values && !num_classes;
  at::Tensor dvalues = want_values ? at::zeros({N, g.size(1)}, t.q.options()) : at::empty({0}, t.q.options());
  for (int64_t start = 0; start < N; start += t.tile) {
    const int64_t n = std::min(t.tile, N - start);
    auto [z, kt] = t.logits(start, n);
    at::Tensor p = (z - shift).exp_();
    at::Tensor dp = num_classes ? g.index_select(1, t.values.narrow(0, start, n)) : at::mm(g, t.value_rows(start, n).t());
    at::Tensor ds = p * (dp - g_out) * t.scale;
    if (l2) {
      dq.add_(at::mm(ds, kt) * 2 - t.q * ds.sum(1, true) * 2);
      if (needs_keys) dkeys.narrow(0, start, n).copy_(at::mm(ds.t(), t.q) * 2 - kt * ds.sum(0).unsqueeze(1) * 2);
    } else {
      dq.add_(at::mm(ds, kt));
      if (needs_keys) dkeys.narrow(0, start, n).copy_(at::mm(ds.t(), t.q));
    }
    if (want_values) dvalues.narrow(0, start, n).copy_(at::mm(p.t(), g));
  }
  return {dq, dkeys, dvalues};
}

}  // namespace kmem
