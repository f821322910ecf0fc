// Torch glue of the CUDA kernels (compiled only in a CUDA build): checks tensors,
// converts them to what the launchers in topk_attention.cuh and compact.cuh take -- float32 queries and
// gradients, float32/float16/bfloat16 rows, contiguous memory -- allocates outputs and
// scratch through torch's allocator, and runs on the current stream.
#include <torch/extension.h>
#ifndef KMEM_CUDA_SIM
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "compact.cuh"
#include "topk_attention.cuh"

namespace kmem {
namespace {

using OptTensor = c10::optional<at::Tensor>;

#ifdef KMEM_CUDA_SIM  // the tests' CPU simulator of these kernels (csrc/cuda/sim): CPU tensors
constexpr const char* kDeviceTensor = "a CPU tensor (simulated CUDA)";
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t stream() { return nullptr; }
#else
constexpr const char* kDeviceTensor = "a CUDA tensor";
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#endif

void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be ", kDeviceTensor, ", got ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but queries are on ",
              like.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// The kernels read float32, float16 and bfloat16 rows; anything else (float64) is
// converted to float32 first.
at::Tensor readable(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 ? t.contiguous() : t.to(at::kFloat).contiguous();
}

cuda::Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::Dtype::f16;
    case at::kBFloat16: return cuda::Dtype::bf16;
    default: return cuda::Dtype::f32;
  }
}

at::Tensor float32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void check_memory(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& ids, const char* op) {
  check_device(queries, queries, op, "queries");
  check_device(keys, queries, op, "keys");
  check_device(ids, queries, op, "slot_ids");
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1), op,
              ": queries [B, d] and keys [N, d] expected, got ", queries.sizes(), " and ", keys.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == keys.size(0), op,
              ": slot_ids must be int64 [N]");
  // A slot is stored in 32 bits of the packed top-k key, and 0xFFFFFFFF is reserved.
  TORCH_CHECK(keys.size(0) < int64_t{0xFFFFFFFF}, op, ": at most 2^32 - 2 rows are supported");
}

// The query rows' excluded ids, each row sorted ascending as the kernels search them.
std::pair<at::Tensor, cuda::Exclusions> exclusions(const OptTensor& exclude_ids, const at::Tensor& queries,
                                                   const char* op) {
  if (!exclude_ids.has_value() || exclude_ids->numel() == 0) return {at::Tensor(), {nullptr, 0}};
  const at::Tensor& ex = *exclude_ids;
  check_device(ex, queries, op, "exclude_ids");
  TORCH_CHECK(ex.scalar_type() == at::kLong && ex.dim() == 2 && ex.size(0) == queries.size(0), op,
              ": exclude_ids must be int64 [B, E]");
  at::Tensor sorted = std::get<0>(ex.sort(1)).contiguous();
  return {sorted, {sorted.data_ptr<int64_t>(), sorted.size(1)}};
}

// Keys and values as the kernels see them; the returned tensors keep the pointers alive.
struct RowTensors {
  at::Tensor keys, values;
  cuda::Rows rows;
};

RowTensors rows_of(const at::Tensor& keys, const at::Tensor& values, int64_t num_classes, const at::Tensor& queries,
                   const char* op) {
  check_device(values, queries, op, "values");
  RowTensors r{readable(keys), at::Tensor(), {}};
  if (num_classes > 0) {
    TORCH_CHECK(values.scalar_type() == at::kLong && values.dim() == 1 && values.size(0) == keys.size(0), op,
                ": label values must be int64 [N]");
    r.values = values.contiguous();
  } else {
    TORCH_CHECK(values.dim() == 2 && values.size(0) == keys.size(0), op, ": values must be [N, V]");
    r.values = readable(values);
  }
  r.rows = {r.keys.data_ptr(),
            dtype_of(r.keys),
            num_classes > 0 ? nullptr : r.values.data_ptr(),
            dtype_of(r.values),
            num_classes > 0 ? r.values.data_ptr<int64_t>() : nullptr,
            r.keys.size(0),
            r.keys.size(1),
            num_classes > 0 ? num_classes : r.values.size(1)};
  return r;
}

// A search's arguments as the launchers take them, with the tensors that keep their
// pointers alive: float32 queries, contiguous ids, each query's excluded ids sorted, and
// the workspace. `keys` must already be readable (see readable).
struct SearchCall {
  at::Tensor q, keys, ids, sorted, workspace;
  cuda::SearchArgs args;
};

SearchCall search_call(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids,
                       const OptTensor& exclude_ids, int64_t k, bool l2, const char* op) {
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  SearchCall c;
  c.q = float32(queries);
  c.keys = keys;
  c.ids = slot_ids.contiguous();
  const auto [sorted, ex] = exclusions(exclude_ids, queries, op);
  c.sorted = sorted;
  c.workspace = workspace(cuda::search_workspace_bytes(c.q.size(0), keys.size(0), k), c.q);
  c.args = {c.q.data_ptr<float>(), c.q.size(0), keys.data_ptr(), dtype_of(keys), keys.size(0), keys.size(1),
            c.ids.data_ptr<int64_t>(), ex, k, l2};
  return c;
}

// A float32 gradient buffer, or an empty tensor standing for "not needed".
at::Tensor empty_or(bool needed, at::IntArrayRef shape, const at::Tensor& like) {
  const auto options = like.options().dtype(at::kFloat);
  return needed ? at::empty(shape, options) : at::empty({0}, options);
}

float* ptr_or_null(bool needed, at::Tensor& t) { return needed ? t.data_ptr<float>() : nullptr; }

// ------------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor> cuda_search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& slot_ids, int64_t k,
                       bool l2, const OptTensor& exclude_ids) {
  constexpr const char* op = "cuda_search";
  check_memory(queries, keys, slot_ids, op);
  const DeviceGuard guard(queries.device());
  const SearchCall c = search_call(queries, readable(keys), slot_ids, exclude_ids, k, l2, op);
  at::Tensor scores = at::empty({c.q.size(0), k}, c.q.options());
  at::Tensor slots = at::empty({c.q.size(0), k}, slot_ids.options());
  check_launch(
      cuda::search(c.args, scores.data_ptr<float>(), slots.data_ptr<int64_t>(), c.workspace.data_ptr(), stream()),
      op);
  return {scores, slots};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_topk_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                                 const at::Tensor& values, const at::Tensor& slot_ids,
                                                                 const OptTensor& exclude_ids, int64_t k, double scale,
                                                                 bool l2, int64_t num_classes) {
  constexpr const char* op = "cuda_topk_forward";
  check_memory(queries, keys, slot_ids, op);
  const DeviceGuard guard(queries.device());
  const RowTensors r = rows_of(keys, values, num_classes, queries, op);
  const SearchCall c = search_call(queries, r.keys, slot_ids, exclude_ids, k, l2, op);
  at::Tensor out = at::empty({c.q.size(0), r.rows.width}, c.q.options());
  at::Tensor slots = at::empty({c.q.size(0), k}, slot_ids.options());
  at::Tensor weights = at::empty({c.q.size(0), k}, c.q.options());
  check_launch(cuda::topk_forward(c.args, r.rows, static_cast<float>(scale), out.data_ptr<float>(),
                                  slots.data_ptr<int64_t>(), weights.data_ptr<float>(), c.workspace.data_ptr(),
                                  stream()),
               op);
  return {out, slots, weights};
}

std::tuple<at::Tensor, at::Tensor> cuda_attend_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                       const at::Tensor& values, const at::Tensor& slots,
                                                       double scale, bool l2, int64_t num_classes) {
  constexpr const char* op = "cuda_attend_forward";
  check_device(queries, queries, op, "queries");
  check_device(slots, queries, op, "slots");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == queries.size(0), op,
              ": slots must be int64 [B, k]");
  const DeviceGuard guard(queries.device());
  const at::Tensor q = float32(queries), sc = slots.contiguous();
  const RowTensors r = rows_of(keys, values, num_classes, queries, op);
  TORCH_CHECK(q.size(1) == r.rows.d, op, ": queries and keys differ in d");
  at::Tensor out = at::empty({q.size(0), r.rows.width}, q.options());
  at::Tensor weights = at::empty({q.size(0), sc.size(1)}, q.options());
  const cuda::AttendArgs args{q.data_ptr<float>(), q.size(0), r.rows, sc.data_ptr<int64_t>(), sc.size(1),
                              static_cast<float>(scale), l2};
  check_launch(cuda::attend_forward(args, out.data_ptr<float>(), weights.data_ptr<float>(), stream()), op);
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_attend_backward(const at::Tensor& grad_out,
                                                                    const at::Tensor& queries,
                                                                    const at::Tensor& keys, const at::Tensor& values,
                                                                    const at::Tensor& slots,
                                                                    const at::Tensor& weights, double scale, bool l2,
                                                                    int64_t num_classes, bool needs_keys,
                                                                    bool needs_values, bool per_retrieval) {
  constexpr const char* op = "cuda_attend_backward";
  check_device(grad_out, queries, op, "grad_out");
  check_device(slots, queries, op, "slots");
  check_device(weights, queries, op, "weights");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == queries.size(0), op,
              ": slots must be int64 [B, k]");
  TORCH_CHECK(weights.sizes() == slots.sizes(), op, ": weights must be [B, k] like slots");
  const DeviceGuard guard(queries.device());
  const at::Tensor q = float32(queries), g = float32(grad_out), w = float32(weights), sc = slots.contiguous();
  const RowTensors r = rows_of(keys, values, num_classes, queries, op);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == q.size(0) && g.size(1) == r.rows.width, op,
              ": grad_out must be [B, W]");
  const bool want_values = needs_values && num_classes == 0;
  const int64_t m = sc.numel();  // retrievals
  at::Tensor dq = at::empty_like(q), ds = at::empty_like(w);
  at::Tensor key_grads = empty_or(needs_keys, {m, r.rows.d}, q);
  at::Tensor value_grads = empty_or(want_values, {m, r.rows.width}, q);
  const cuda::AttendArgs args{q.data_ptr<float>(), q.size(0), r.rows, sc.data_ptr<int64_t>(), sc.size(1),
                              static_cast<float>(scale), l2};
  check_launch(cuda::attend_backward(args, g.data_ptr<float>(), w.data_ptr<float>(), ds.data_ptr<float>(),
                                     dq.data_ptr<float>(), ptr_or_null(needs_keys, key_grads),
                                     ptr_or_null(want_values, value_grads), stream()),
               op);
  if (per_retrieval) return {dq, key_grads, value_grads};  // a sparse gradient's rows, as they are
  // Rows that several retrievals share sum their shares in retrieval order (a stable
  // sort of the slots), not by atomics: the same bits on every run.
  at::Tensor dkeys = empty_or(needs_keys, {r.rows.n, r.rows.d}, q);
  at::Tensor dvalues = empty_or(want_values, {r.rows.n, r.rows.width}, q);
  if (needs_keys || want_values) {
    const at::Tensor order = at::argsort(sc.view({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto scatter = [&](const at::Tensor& rows, at::Tensor& out) {
      check_launch(cuda::scatter_rows(rows.data_ptr<float>(), sc.data_ptr<int64_t>(), order.data_ptr<int64_t>(), m,
                                      out.size(1), out.size(0), out.data_ptr<float>(), stream()),
                   op);
    };
    if (needs_keys) scatter(key_grads, dkeys);
    if (want_values) scatter(value_grads, dvalues);
  }
  return {dq, dkeys, dvalues};
}

std::tuple<at::Tensor, at::Tensor> cuda_dense_forward(const at::Tensor& queries, const at::Tensor& keys,
                                                      const at::Tensor& values, const at::Tensor& slot_ids,
                                                      const OptTensor& exclude_ids, double scale, bool l2,
                                                      int64_t num_classes) {
  constexpr const char* op = "cuda_dense_forward";
  check_memory(queries, keys, slot_ids, op);
  const DeviceGuard guard(queries.device());
  const at::Tensor q = float32(queries), ids = slot_ids.contiguous();
  const RowTensors r = rows_of(keys, values, num_classes, queries, op);
  const auto [sorted, ex] = exclusions(exclude_ids, queries, op);
  at::Tensor out = at::empty({q.size(0), r.rows.width}, q.options()), lse = at::empty({q.size(0)}, q.options());
  at::Tensor ws = workspace(cuda::dense_forward_workspace_bytes(q.size(0), r.rows.n, r.rows.width), q);
  const cuda::DenseArgs args{q.data_ptr<float>(), q.size(0), r.rows, ids.data_ptr<int64_t>(), ex,
                             static_cast<float>(scale), l2};
  check_launch(cuda::dense_forward(args, out.data_ptr<float>(), lse.data_ptr<float>(), ws.data_ptr(), stream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_dense_backward(
    const at::Tensor& grad_out, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& slot_ids, const OptTensor& exclude_ids, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& grad_lse, double scale, bool l2, int64_t num_classes, bool needs_keys, bool needs_values) {
  constexpr const char* op = "cuda_dense_backward";
  check_memory(queries, keys, slot_ids, op);
  check_device(grad_out, queries, op, "grad_out");
  check_device(out, queries, op, "out");
  check_device(lse, queries, op, "lse");
  check_device(grad_lse, queries, op, "grad_lse");
  const DeviceGuard guard(queries.device());
  const at::Tensor q = float32(queries), g = float32(grad_out), o = float32(out), l = float32(lse);
  const at::Tensor gl = float32(grad_lse);
  const at::Tensor ids = slot_ids.contiguous();
  const RowTensors r = rows_of(keys, values, num_classes, queries, op);
  TORCH_CHECK(g.sizes() == o.sizes() && g.dim() == 2 && g.size(0) == q.size(0) && g.size(1) == r.rows.width, op,
              ": grad_out and out must be [B, W]");
  TORCH_CHECK(l.dim() == 1 && l.size(0) == q.size(0), op, ": lse must be [B]");
  TORCH_CHECK(gl.sizes() == l.sizes(), op, ": grad_lse must be [B] like lse");
  const auto [sorted, ex] = exclusions(exclude_ids, queries, op);
  const bool want_values = needs_values && num_classes == 0;
  at::Tensor dq = at::empty_like(q);
  at::Tensor dkeys = empty_or(needs_keys, {r.rows.n, r.rows.d}, q);
  at::Tensor dvalues = empty_or(want_values, {r.rows.n, r.rows.width}, q);
  at::Tensor ws = workspace(cuda::dense_backward_workspace_bytes(q.size(0), r.rows.n, r.rows.d), q);
  const cuda::DenseArgs args{q.data_ptr<float>(), q.size(0), r.rows, ids.data_ptr<int64_t>(), ex,
                             static_cast<float>(scale), l2};
  check_launch(cuda::dense_backward(args, g.data_ptr<float>(), gl.data_ptr<float>(), o.data_ptr<float>(), l.data_ptr<float>(),
                                    dq.data_ptr<float>(), ptr_or_null(needs_keys, dkeys),
                                    ptr_or_null(want_values, dvalues), ws.data_ptr(), stream()),
               op);
  return {dq, dkeys, dvalues};
}

int64_t cuda_compact_rows(const std::vector<at::Tensor>& srcs, const at::Tensor& keep,
                          const std::vector<at::Tensor>& outs) {
  constexpr const char* op = "cuda_compact_rows";
  TORCH_CHECK(!srcs.empty() && srcs.size() == outs.size(), op, ": src and out must list the same buffers");
  check_device(keep, keep, op, "keep");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.is_contiguous(), op,
              ": keep must be a contiguous bool vector");
  const int64_t rows = keep.size(0);
  for (size_t b = 0; b < srcs.size(); ++b) {
    const at::Tensor &src = srcs[b], &out = outs[b];
    check_device(src, keep, op, "src");
    check_device(out, keep, op, "out");
    TORCH_CHECK(src.dim() >= 1 && src.size(0) == rows, op, ": every src must have one row per entry of keep");
    TORCH_CHECK(out.scalar_type() == src.scalar_type() && out.dim() == src.dim() &&
                    out.sizes().slice(1) == src.sizes().slice(1),
                op, ": out must have src's dtype and row shape");
    TORCH_CHECK(src.is_contiguous() && out.is_contiguous(), op, ": tensors must be contiguous");
  }
  const DeviceGuard guard(keep.device());
  if (rows == 0) return 0;
  // One scan of keep serves every buffer, and one host sync (the size check) all of them.
  at::Tensor positions = at::empty({rows}, keep.options().dtype(at::kLong));
  at::Tensor ws = workspace(cuda::compact_workspace_bytes(rows), keep);
  check_launch(cuda::compact_scan(keep.data_ptr<bool>(), rows, positions.data_ptr<int64_t>(), ws.data_ptr(), stream()),
               op);
  const int64_t kept = positions[rows - 1].item<int64_t>();
  for (const at::Tensor& out : outs)
    TORCH_CHECK(out.size(0) >= kept, op, ": out holds ", out.size(0), " rows but ", kept, " are kept");
  std::vector<cuda::CopyBuffer> buffers;
  for (size_t b = 0; b < srcs.size(); ++b)
    buffers.push_back({srcs[b].data_ptr(), outs[b].data_ptr(), srcs[b].numel() / rows * srcs[b].element_size()});
  for (size_t first = 0; first < buffers.size(); first += cuda::kMaxCopyBuffers) {
    const int count = static_cast<int>(std::min<size_t>(cuda::kMaxCopyBuffers, buffers.size() - first));
    check_launch(cuda::compact_copy(buffers.data() + first, count, keep.data_ptr<bool>(),
                                    positions.data_ptr<int64_t>(), rows, stream()),
                 op);
  }
  return kept;
}

}  // namespace

void register_cuda(pybind11::module& m) {
  m.def("cuda_search", &cuda_search, "CUDA fused top-k search: (scores, slots) [B, k] of the best live rows per query",
        py::arg("queries"), py::arg("keys"), py::arg("slot_ids"), py::arg("k"), py::arg("l2"),
        py::arg("exclude_ids") = py::none());
  m.def("cuda_topk_forward", &cuda_topk_forward,
        "CUDA top-k attention in one pass (search, then attention over the rows found): (out, slots, weights)",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("slot_ids"), py::arg("exclude_ids"),
        py::arg("k"), py::arg("scale"), py::arg("l2"), py::arg("num_classes"));
  m.def("cuda_attend_forward", &cuda_attend_forward, "CUDA softmax attention over chosen slots: (out, weights)",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("slots"), py::arg("scale"), py::arg("l2"),
        py::arg("num_classes"));
  m.def("cuda_attend_backward", &cuda_attend_backward, "Gradients of cuda_attend_forward: (dq, dkeys, dvalues); per_retrieval: row gradients [B k, ...]",
        py::arg("grad_out"), py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("slots"),
        py::arg("weights"), py::arg("scale"), py::arg("l2"), py::arg("num_classes"), py::arg("needs_keys"),
        py::arg("needs_values"), py::arg("per_retrieval"));
  m.def("cuda_dense_forward", &cuda_dense_forward, "CUDA attention over every live row: (out, lse)",
        py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("slot_ids"), py::arg("exclude_ids"),
        py::arg("scale"), py::arg("l2"), py::arg("num_classes"));
  m.def("cuda_dense_backward", &cuda_dense_backward, "Gradients of cuda_dense_forward: (dq, dkeys, dvalues)",
        py::arg("grad_out"), py::arg("queries"), py::arg("keys"), py::arg("values"), py::arg("slot_ids"),
        py::arg("exclude_ids"), py::arg("out"), py::arg("lse"), py::arg("grad_lse"), py::arg("scale"),
        py::arg("l2"), py::arg("num_classes"), py::arg("needs_keys"), py::arg("needs_values"));
  m.def("cuda_compact_rows", &cuda_compact_rows,
        "CUDA stable compaction: the kept rows of each src buffer, in order, to the front of its out; returns "
        "their count",
        py::arg("srcs"), py::arg("keep"), py::arg("outs"));
}

}  // namespace kmem
