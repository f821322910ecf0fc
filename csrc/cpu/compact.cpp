// Stable compaction: copy the kept rows of `src` to the front of `out`, in order.
//
// Rows are moved as raw bytes, so one kernel serves keys, values and ids of any
// dtype. Two passes over the (cheap) keep mask -- count per block, exclusive scan --
// then every thread copies its block's runs of kept rows with one memcpy per run.
#include "compact.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "counters.h"

namespace kmem {

int64_t compact_rows(const at::Tensor& src, const at::Tensor& keep, at::Tensor& out) {
  TORCH_CHECK(src.device().is_cpu() && keep.device().is_cpu() && out.device().is_cpu(),
              "compact_rows: all tensors must be on the CPU");
  TORCH_CHECK(src.dim() >= 1, "compact_rows: src must have at least one dimension");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.size(0) == src.size(0),
              "compact_rows: keep must be a bool vector with one entry per row of src");
  TORCH_CHECK(out.scalar_type() == src.scalar_type(), "compact_rows: out dtype must match src");
  TORCH_CHECK(out.dim() == src.dim() && out.sizes().slice(1) == src.sizes().slice(1),
              "compact_rows: out rows must have the shape of src rows");
  TORCH_CHECK(src.is_contiguous() && out.is_contiguous() && keep.is_contiguous(),
              "compact_rows: tensors must be contiguous");
  count_call("compact_rows");

  const int64_t rows = src.size(0);
  const int64_t row_bytes = rows ? src.numel() / rows * src.element_size() : 0;
  const bool* k = keep.data_ptr<bool>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());

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
  TORCH_CHECK(out.size(0) >= kept, "compact_rows: out holds ", out.size(0), " rows but ", kept, " are kept");

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    int64_t dst = first[t];
    const int64_t end = std::min(rows, (t + 1) * block);
    for (int64_t i = t * block; i < end;) {
      if (!k[i]) { ++i; continue; }
      int64_t j = i;
      while (j < end && k[j]) ++j;
      std::memcpy(o + dst * row_bytes, s + i * row_bytes, (j - i) * row_bytes);
      dst += j - i;
      i = j;
    }
  }
  return kept;
}

}  // namespace kmem
