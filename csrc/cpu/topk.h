#pragma once
// Top-k bookkeeping shared by the CPU kernels.
//
// A candidate row is one int64 "packed key": the float32 score's bits, made to order
// as signed integers, in the high word, and (0xFFFFFFFF - slot) in the low word. Keys
// then order by (score desc, slot asc) -- the tie rule of every kmem backend -- and
// the smallest int64 means "no row".
#include <immintrin.h>

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

// Moves the k largest of the n keys v[0, n) to v[0, k), in no order. A
// quickselect (pivot: median of three) whose partition writes each side eight keys at a
// time with AVX-512 compress into a thread's scratch and copies them back: the branch
// per key of std::nth_element's partition mispredicts on half of them, and was most of
// what keeping the k = 4096 best cost.
inline void select_top(int64_t* v, int64_t n, int64_t k) {
  if (n <= k) return;
  int64_t lo = 0, hi = n;  // v[0, lo) are among the k largest, v[hi, n) are not
#if defined(__AVX512F__)
  thread_local std::vector<int64_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < 2 * (n + 8)) scratch.resize(2 * (n + 8));
  int64_t* above = scratch.data();
  int64_t* rest = above + n + 8;
  while (hi - lo > 64) {
    const int64_t a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    const int64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    const __m512i p = _mm512_set1_epi64(pivot);
    int64_t na = 0, nr = 0, i = lo;
    for (; i + 8 <= hi; i += 8) {
      const __m512i x = _mm512_loadu_si512(v + i);
      const __mmask8 m = _mm512_cmpgt_epi64_mask(x, p);
      _mm512_storeu_si512(above + na, _mm512_maskz_compress_epi64(m, x));
      _mm512_storeu_si512(rest + nr, _mm512_maskz_compress_epi64(static_cast<__mmask8>(~m), x));
      na += __builtin_popcount(m);
      nr += 8 - __builtin_popcount(m);
    }
    for (; i < hi; ++i) (v[i] > pivot ? above[na++] : rest[nr++]) = v[i];
    std::copy_n(above, na, v + lo);
    std::copy_n(rest, nr, v + lo + na);
    if (na == 0) break;  // the pivot was the largest key, repeated (kNoRow padding)
    if (lo + na == k) return;
    if (lo + na > k)
      hi = lo + na;
    else
      lo += na;
  }
#endif
  std::nth_element(v + lo, v + (k - 1), v + hi, std::greater<int64_t>());
}

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
    select_top(buf_.data(), static_cast<int64_t>(buf_.size()), k_);
    buf_.resize(k_);
    floor_ = packed_score(*std::min_element(buf_.begin(), buf_.end()));
  }
  int64_t* out_;
  int64_t k_;
  std::vector<int64_t> buf_;
  float floor_ = -std::numeric_limits<float>::infinity();
};

}  // namespace kmem
