#pragma once
// Top-k bookkeeping shared by the CPU kernels.
//
// A candidate row is one int64 "packed key": the float32 score's bits, made to order
// as signed integers, in the high word, and (0xFFFFFFFF - slot) in the low word. Keys
// then order by (score desc, slot asc) -- the tie rule of every kmem backend -- and
// the smallest int64 means "no row".
#include <cstdint>
#include <cstring>
#include <limits>

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
  int32_t bits = static_cast<int32_t>(key >> 32);
  bits = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  float score;
  std::memcpy(&score, &bits, sizeof score);
  return score;
}

inline int64_t packed_slot(int64_t key) { return key == kNoRow ? -1 : 0xFFFFFFFFLL - (key & 0xFFFFFFFFLL); }

// The k best packed keys seen so far, as a min-heap over a caller-owned array (root =
// the worst kept). `floor` is the root's score: a row scanned in increasing slot order
// enters only if its score is strictly higher, which keeps the tie rule exact.
class TopK {
 public:
  TopK(int64_t* heap, int64_t k) : h_(heap), k_(k) {
    for (int64_t i = 0; i < k; ++i) h_[i] = kNoRow;
  }
  float floor() const { return floor_; }
  void push(int64_t key) {
    if (key <= h_[0]) return;
    h_[0] = key;
    sift_down();
    floor_ = h_[0] == kNoRow ? -std::numeric_limits<float>::infinity() : packed_score(h_[0]);
  }

 private:
  void sift_down() {
    int64_t i = 0;
    const int64_t v = h_[0];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= k_) break;
      if (c + 1 < k_ && h_[c + 1] < h_[c]) ++c;
      if (h_[c] >= v) break;
      h_[i] = h_[c];
      i = c;
    }
    h_[i] = v;
  }
  int64_t* h_;
  int64_t k_;
  float floor_ = -std::numeric_limits<float>::infinity();
};

}  // namespace kmem
