#pragma once
// Per-op call counters: tests read them to prove that the compiled kernel, not the
// PyTorch fallback, served a call.
#include <cstdint>
#include <string>

namespace kmem {
void count_call(const std::string& op);
int64_t call_count(const std::string& op);
}  // namespace kmem
