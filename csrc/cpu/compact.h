#pragma once
#include <ATen/ATen.h>

namespace kmem {
// Copies the rows of `src` where `keep` is true, in order, to the first rows of
// `out`; returns how many were copied. Rows beyond that in `out` are untouched.
int64_t compact_rows(const at::Tensor& src, const at::Tensor& keep, at::Tensor& out);

// Overwrites the bytes of the rows `rows` (int64, each in [0, dst.size(0))) of `dst`
// with zeros -- the scrub of deleted rows.
void zero_rows(at::Tensor& dst, const at::Tensor& rows);
}  // namespace kmem
