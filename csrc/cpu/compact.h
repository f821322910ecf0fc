#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace kmem {
// For every buffer b, copies the rows of `srcs[b]` where `keep` is true, in order, to
// the first rows of `outs[b]`; returns how many rows each received. Rows beyond that in
// the outputs are untouched. `keep` is scanned once for all buffers.
int64_t compact_rows(const std::vector<at::Tensor>& srcs, const at::Tensor& keep, const std::vector<at::Tensor>& outs);

// Overwrites the bytes of the rows `rows` (int64, each in [0, dst.size(0))) of `dst`
// with zeros -- the scrub of deleted rows.
void zero_rows(at::Tensor& dst, const at::Tensor& rows);
}  // namespace kmem
