// The one CUB call kmem makes, on the CPU: DeviceScan::InclusiveSum with CUB's
// two-step protocol (a null workspace asks for its size).
#pragma once
#include <cstddef>

#include "../../cuda_runtime.h"

namespace cub {
struct DeviceScan {
  template <typename In, typename Out, typename Count>
  static cudaError_t InclusiveSum(void* workspace, size_t& bytes, In in, Out out, Count n, cudaStream_t = nullptr) {
    if (workspace == nullptr) {
      bytes = 1;
      return cudaSuccess;
    }
    auto total = decltype(in[0] + in[0]){};
    for (Count i = 0; i < n; ++i) out[i] = total += in[i];
    return cudaSuccess;
  }
};
}  // namespace cub
