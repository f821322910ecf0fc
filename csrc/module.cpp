// Python bindings of kmem._C.
#include <torch/extension.h>

#include "cpu/attend.h"
#include "cpu/compact.h"
#include "cpu/search.h"

#ifdef KMEM_WITH_CUDA
namespace kmem {
// Defined in csrc/cuda/*.cpp, compiled only in a CUDA build: binds the CUDA kernels.
void register_cuda(pybind11::module& m);
}  // namespace kmem
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kmem compiled kernels";
  m.def("compact_rows", &kmem::compact_rows, "Stable compaction of the kept rows of each src buffer into its out",
        py::arg("srcs"), py::arg("keep"), py::arg("outs"));
  m.def("zero_rows", &kmem::zero_rows, "Overwrite the bytes of rows `rows` of dst with zeros", py::arg("dst"),
        py::arg("rows"));
  m.def("search", &kmem::search, "Fused top-k search: (scores, slots) [B, k] of the best live rows per query",
        py::arg("queries"), py::arg("keys"), py::arg("slot_ids"), py::arg("k"), py::arg("l2"),
        py::arg("exclude_ids") = py::none());
  m.def("attend_forward", &kmem::attend_forward, "Softmax attention over chosen rows: (out, weights)");
  m.def("attend_backward", &kmem::attend_backward, "Gradients of attend_forward: (dq, dkeys, dvalues); per_retrieval: row gradients [B k, ...]");
  m.def("dense_forward", &kmem::dense_forward, "Attention over every live row: (out, lse)");
  m.def("dense_backward", &kmem::dense_backward, "Gradients of dense_forward: (dq, dkeys, dvalues)");
#ifdef KMEM_WITH_CUDA
  m.attr("with_cuda") = true;
  kmem::register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
