// Byte-level row edits of a memory's buffers: stable compaction (copy the kept rows of
// each source buffer to the front of its output, in order) and the scrub of deleted rows.
//
// Rows are moved as raw bytes, so one kernel serves keys, values and ids of any
// dtype. Compaction: two passes over the (cheap) keep mask -- count per block, exclusive scan --
// then every thread copies its block's runs of kept rows with one memcpy per run and
// buffer, so one scan serves a memory's keys, values and ids together.
#include "compact.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <cstring>
#include <vector>


namespace kmem {
namespace {

struct Buffer {
  const char* src;
  char* out;
  int64_t row_bytes, out_rows;
};

}  // namespace

int64_t compact_rows(const std::vector<at::Tensor>& srcs, const at::Tensor& keep, const std::vector<at::Tensor>& outs) {
  TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.is_contiguous(),
              "compact_rows: keep must be a contiguous bool vector on the CPU");
  TORCH_CHECK(!srcs.empty() && srcs.size() == outs.size(), "compact_rows: src and out must list the same buffers");
  const int64_t rows = keep.size(0);
  std::vector<Buffer> buffers;
  for (size_t b = 0; b < srcs.size(); ++b) {
    const at::Tensor &src = srcs[b], &out = outs[b];
    TORCH_CHECK(src.device().is_cpu() && out.device().is_cpu(), "compact_rows: all tensors must be on the CPU");
    TORCH_CHECK(src.dim() >= 1 && src.size(0) == rows, "compact_rows: every src must have one row per entry of keep");
    TORCH_CHECK(out.scalar_type() == src.scalar_type(), "compact_rows: out dtype must match src");
    TORCH_CHECK(out.dim() == src.dim() && out.sizes().slice(1) == src.sizes().slice(1),
                "compact_rows: out rows must have the shape of src rows");
    TORCH_CHECK(src.is_contiguous() && out.is_contiguous(), "compact_rows: tensors must be contiguous");
    const int64_t row_bytes = rows ? src.numel() / rows * src.element_size() : 0;
    buffers.push_back({static_cast<const char*>(src.data_ptr()), static_cast<char*>(out.data_ptr()), row_bytes,
                       out.size(0)});
  }
  const bool* k = keep.data_ptr<bool>();

  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(rows / 4096 + 1)));
  const int64_t block = (rows + threads - 1) / threads;
  std::vector<int64_t> first(threads + 1, 0);  // first output row of each block

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    int64_t n = 0;
    for (int64_t i = t * block, end = std::min(rows, (t + 1) * block); i < end; ++i) n += k[i];
    first[t + 1] = n;
  }
  for (int t = 0; t < threads; ++t) first[t + 1] += first[t];
  const int64_t kept = first[threads];
  for (const Buffer& b : buffers)
    TORCH_CHECK(b.out_rows >= kept, "compact_rows: out holds ", b.out_rows, " rows but ", kept, " are kept");

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    int64_t dst = first[t];
    const int64_t end = std::min(rows, (t + 1) * block);
    for (int64_t i = t * block; i < end;) {
      if (!k[i]) { ++i; continue; }
      int64_t j = i;
      while (j < end && k[j]) ++j;
      for (const Buffer& b : buffers) std::memcpy(b.out + dst * b.row_bytes, b.src + i * b.row_bytes, (j - i) * b.row_bytes);
      dst += j - i;
      i = j;
    }
  }
  return kept;
}

void zero_rows(at::Tensor& dst, const at::Tensor& rows) {
  TORCH_CHECK(dst.device().is_cpu() && rows.device().is_cpu(), "zero_rows: all tensors must be on the CPU");
  TORCH_CHECK(dst.dim() >= 1 && dst.is_contiguous(), "zero_rows: dst must be contiguous, at least 1-d");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "zero_rows: rows must be a contiguous int64 vector");

  const int64_t n = rows.size(0), size = dst.size(0);
  const int64_t row_bytes = size ? dst.numel() / size * dst.element_size() : 0;
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < size, "zero_rows: row ", r[i], " out of range");
  char* d = static_cast<char*>(dst.data_ptr());
  // The rows are scattered over a buffer far larger than the cache: each is a miss, so
  // the lines of the row a few ahead are requested while this one is written.
  constexpr int64_t ahead = 8;
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n / 4096 + 1)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (i + ahead < n) {
      const char* next = d + r[i + ahead] * row_bytes;
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b, 1);
    }
    std::memset(d + r[i] * row_bytes, 0, row_bytes);
  }
  // An in-place edit, like index_fill_: a graph that saved dst must see it changed.
  dst.unsafeGetTensorImpl()->bump_version();
}

}  // namespace kmem
