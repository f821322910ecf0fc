#pragma once
// Top-k bookkeeping shared by the CPU kernels.
//
// A candidate row is one int64 "packed key": the float32 score's bits, made to order
// as signed integers, in the high word, and (0xFFFFFFFF - slot) in the low word. Keys
// then order by (score desc, slot asc) -- the tie rule of every kmem backend -- and
// the smallest int64 means "no row".
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace kmem {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::min();

inline int64_t pack(float score, int64_t slot) {
  score += 0.0f;  // -0.0 and +0.0 must tie
  int32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  return (static_cast<int64_t>(bits) << 32) | (0xFFFFFFFFLL - slot);
}

inline float packed_score(int64_t key) {
  if (key == kNoRow) return -std::numeric_limits<float>::infinity();
  int32_t bits = static_cast<int32_t>(key >> 32);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  float score;
  std::memcpy(&score, &bits, sizeof score);
  return score;
}

inline int64_t packed_slot(int64_t key) { return key == kNoRow ? -1 : 0xFFFFFFFFLL - (key & 0xFFFFFFFFLL); }

// The k best packed keys among those pushed, for rows offered in increasing slot order
// with a score above floor() (which keeps the tie rule exact: a later row with the
// floor's score has a higher slot and loses). Keys are appended to a buffer of 2k; when
// it fills, a selection keeps the k best and the floor rises to the k-th's score. An
// append touches one cache line where a heap's sift touches log k lines spread over
// 8k bytes: with 64 queries x k = 4096 a thread's heaps (2 MB) left L2 and pushing
// cost ~3x the scan itself. finish() writes the k best, unordered, to `out` (kNoRow
// past the pushed keys).
class TopK {
 public:
  TopK(int64_t* out, int64_t k) : out_(out), k_(k) { buf_.reserve(2 * k); }
  float floor() const { return floor_; }
  void push(int64_t key) {
    buf_.push_back(key);
    if (static_cast<int64_t>(buf_.size()) == 2 * k_) keep_best();
  }
  void finish() {
    if (static_cast<int64_t>(buf_.size()) > k_) keep_best();
    std::copy(buf_.begin(), buf_.end(), out_);
    std::fill(out_ + buf_.size(), out_ + k_, kNoRow);
  }

 private:
  void keep_best() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), std::greater<int64_t>());
    buf_.resize(k_);
    floor_ = packed_score(buf_[k_ - 1]);
  }
  int64_t* out_;
  int64_t k_;
  std::vector<int64_t> buf_;
  float floor_ = -std::numeric_limits<float>::infinity();
};

}  // namespace kmem
