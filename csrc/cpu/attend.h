#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace kmem {

// Post-scan attention over the chosen rows, float32 working precision.
// queries [B, d] f32; keys [N, d] f32/bf16/f16; values [N, V] (num_classes == 0, same
// float dtypes) or int64 labels [N]; slots [B, k] int64 (-1 = none).
// Returns (out [B, W], weights [B, k]); W = V or num_classes.
std::tuple<at::Tensor, at::Tensor> attend_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                  const at::Tensor& values, const at::Tensor& slots, double scale,
                                                  bool l2, int64_t num_classes);

// (d queries [B, d], d keys [N, d] or empty, d values [N, V] or empty), float32. With
// per_retrieval the row gradients are [B k, d] and [B k, V] instead: retrieval (b, j)'s
// share in row b k + j (zero where its slot is -1), for a sparse gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attend_backward(const at::Tensor& grad_out, const at::Tensor& queries,
                                                               const at::Tensor& keys, const at::Tensor& values,
                                                               const at::Tensor& slots, const at::Tensor& weights,
                                                               double scale, bool l2, int64_t num_classes,
                                                               bool needs_keys, bool needs_values,
                                                               bool per_retrieval);

// Attention over every live, non-excluded row, streamed over key tiles with an online
// softmax: (out [B, W], lse [B]); lse = -inf and out = 0 for a query with no row.
std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                 const at::Tensor& values, const at::Tensor& slot_ids,
                                                 const c10::optional<at::Tensor>& exclude_ids, double scale, bool l2,
                                                 int64_t num_classes);

// Gradients of dense_forward, recomputing each tile's weights from lse; grad_lse [B] is
// the gradient reaching lse (it shifts each query's g . out).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_out, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& slot_ids, const c10::optional<at::Tensor>& exclude_ids, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_lse, double scale, bool l2, int64_t num_classes, bool needs_keys,
    bool needs_values);

}  // namespace kmem
