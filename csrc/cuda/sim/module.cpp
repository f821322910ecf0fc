// kmem's CUDA kernels and their torch glue, compiled with g++ for the CPU simulator
// (runtime.h): the test module `kmem_cuda_sim`, built by tests/_cuda_sim.py. One
// translation unit: the .cu sources are included as they are, and csrc/cuda/sim
// comes first on the include path so <cuda_runtime.h> is the simulator's.
#undef _FORTIFY_SOURCE  // its longjmp check refuses the jumps between fiber stacks

#include <torch/extension.h>

#include "../attend.cu"
#include "../compact.cu"
#include "../dense.cu"
#include "../search.cu"
#include "../bindings.cpp"
#include "selftest.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kmem's CUDA kernels, run on the CPU by a simulator (tests only)";
  kmem::register_cuda(m);
  m.def("selftest", &kmem::sim::selftest::launch_checked,
        "Launch a self-test kernel on one block; returns the simulator's error text (empty: it ran)");
}
