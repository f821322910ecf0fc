// The scheduler of kmem's CUDA simulator: runs a kernel's thread blocks on the CPU, one
// block at a time, each CUDA thread a fiber on its own stack. A fiber runs until it
// reaches __syncthreads (or a warp-wide exchange: a shuffle or a ballot) and
// waits there; a barrier opens once every thread it binds has arrived. Threads that
// have exited count as arrived at __syncthreads (as on Volta and later) but not at a
// warp exchange, which on a GPU is undefined for an exited lane: the simulator fails
// the launch with a message, as it does for a warp split between two barriers (a
// deadlock on the GPU) or for lanes that reach a full-mask exchange at different places.
//
// What it checks that compiling cannot: the kernels' arithmetic and indexing, every
// barrier and warp exchange, launch limits (threads per block, grid size, dynamic
// shared memory past 48 KB without an opt-in, past the 227 KB of sm_90). Dynamic
// shared memory starts each block as 0xFF bytes (NaN as floats), so reading it before
// writing shows; static __shared__ variables keep the previous block's values. Blocks
// run in a seeded shuffled order and the fibers of each phase in a varying order, so a
// result that depends on block or thread order shows too. What it cannot: races within
// a phase (a fiber runs alone between barriers), memory ordering, speed.
//
// Compiled only into the test module (csrc/cuda/sim/module.cpp, -DKMEM_CUDA_SIM).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Read by kernels as on a GPU; the scheduler sets them before it resumes a fiber.
inline uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;

namespace kmem {
namespace sim {

inline constexpr size_t kStackBytes = 128 << 10;
inline constexpr size_t kDefaultSmem = 48 << 10;   // without cudaFuncSetAttribute
inline constexpr size_t kMaxSmem = 232448;         // sm_90's opt-in limit per block
inline constexpr unsigned kMaxThreads = 1024;

enum class Wait : unsigned char { ready, block, warp, done };

struct Fiber {
  jmp_buf ctx;
  Wait wait;
  bool started;
  unsigned parity;  // which half of its warp's exchange slots the next exchange uses
  const void* site;  // where in the code it waits at a warp exchange
  uint3 tid;
};

// The launch in progress (one at a time: launches hold `mutex`).
struct Launch {
  std::mutex mutex;
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  size_t stack_count = 0;
  std::vector<uint64_t> slots;  // per warp: 2 x 32 exchange slots
  std::vector<unsigned char> smem;
  jmp_buf scheduler;
  ucontext_t start;
  int current = 0;
  std::string failure;  // why the launch failed, empty while it runs well
  std::map<const void*, size_t> granted;  // dynamic shared memory opted in per kernel
  uint64_t launches = 0;
};

inline Launch& launch_state() {
  static Launch s;
  return s;
}

[[noreturn]] inline void fiber_entry() {
  Launch& s = launch_state();
  s.body();
  s.fibers[s.current].wait = Wait::done;
  _longjmp(s.scheduler, 1);
}

// Back to the scheduler, marked as waiting at `w` (from code address `site`); returns
// when the barrier opens.
inline void wait_at(Wait w, const void* site = nullptr) {
  Launch& s = launch_state();
  Fiber& f = s.fibers[s.current];
  f.wait = w;
  f.site = site;
  if (_setjmp(f.ctx) == 0) _longjmp(s.scheduler, 1);
}

inline void resume(Launch& s, int i) {
  Fiber& f = s.fibers[i];
  s.current = i;
  threadIdx = f.tid;
  if (_setjmp(s.scheduler) != 0) return;  // the fiber waits at a barrier, or is done
  if (f.started) _longjmp(f.ctx, 1);
  f.started = true;
  getcontext(&s.start);
  s.start.uc_stack.ss_sp = s.stacks.get() + static_cast<size_t>(i) * kStackBytes;
  s.start.uc_stack.ss_size = kStackBytes;
  s.start.uc_link = nullptr;
  makecontext(&s.start, fiber_entry, 0);
  setcontext(&s.start);
}

// Opens the barriers every waiting thread has reached. Returns false when all threads
// are done, and sets `failure` when some wait at a barrier that can never open.
inline bool open_barriers(Launch& s) {
  const int n = static_cast<int>(s.fibers.size());
  bool opened = false;
  int done = 0;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int w1 = std::min(n, w0 + 32);
    int at_warp = 0, exited = 0, elsewhere = 0;
    for (int i = w0; i < w1; ++i) {
      at_warp += s.fibers[i].wait == Wait::warp;
      exited += s.fibers[i].wait == Wait::done;
      elsewhere += s.fibers[i].wait == Wait::warp && s.fibers[i].site != s.fibers[w0].site;
    }
    done += exited;
    if (at_warp == 0) continue;
    if (at_warp != w1 - w0) {
      s.failure = "warp " + std::to_string(w0 / 32) + " of block (" + std::to_string(blockIdx.x) + ", " +
                  std::to_string(blockIdx.y) + "): " + std::to_string(at_warp) + " lanes wait at a warp exchange while " +
                  std::to_string(exited) + " have exited and the rest wait at __syncthreads";
      return false;
    }
    if (elsewhere > 0) {  // a full-mask exchange that the lanes reach at different places
      s.failure = "warp " + std::to_string(w0 / 32) + " of block (" + std::to_string(blockIdx.x) + ", " +
                  std::to_string(blockIdx.y) + "): its lanes wait at warp exchanges in " +
                  "different places of the code";
      return false;
    }
    for (int i = w0; i < w1; ++i) s.fibers[i].wait = Wait::ready;
    opened = true;
  }
  if (opened) return true;
  if (done == n) return false;
  for (Fiber& f : s.fibers)
    if (f.wait == Wait::block) f.wait = Wait::ready;
  return true;
}

inline void run_block(Launch& s, std::mt19937& rng) {
  const int n = static_cast<int>(s.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.wait = Wait::ready;
    f.started = false;
    f.parity = 0;
    f.tid = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
  }
  std::fill(s.smem.begin(), s.smem.end(), 0xFF);
  bool forward = true;
  do {
    // Each phase starts at another thread and alternates direction.
    const int first = static_cast<int>(rng() % static_cast<unsigned>(n));
    for (int step = 0; step < n; ++step) {
      const int i = forward ? (first + step) % n : (first - step + n) % n;
      if (s.fibers[i].wait == Wait::ready) resume(s, i);
    }
    forward = !forward;
  } while (open_barriers(s));
}

inline std::string limits_broken(dim3 grid, dim3 block, size_t smem, size_t granted) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64)
    return "a block of " + std::to_string(threads) + " threads (at most 1024, z at most 64)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
           ") (each at least 1, y and z at most 65535)";
  if (smem > std::max(kDefaultSmem, granted))
    return std::to_string(smem) + " bytes of dynamic shared memory without an opt-in for more than 48 KB (" +
           std::to_string(granted) + " granted)";
  return {};
}

// Runs body() as every thread of every block of `grid`; returns why the launch
// failed, or an empty string.
inline std::string run(const void* kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  Launch& s = launch_state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  const auto it = s.granted.find(kernel);
  std::string broken = limits_broken(grid, block, smem, it == s.granted.end() ? 0 : it->second);
  if (!broken.empty()) return "invalid launch: " + broken;
  const size_t n = size_t{block.x} * block.y * block.z;
  if (s.stack_count < n) {
    s.stacks.reset(new char[n * kStackBytes]);
    s.stack_count = n;
  }
  s.fibers.assign(n, Fiber{});
  s.slots.assign((n + 31) / 32 * 64, 0);
  s.smem.assign(smem, 0xFF);
  s.body = std::move(body);
  s.failure.clear();
  blockDim = block;
  gridDim = grid;
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  std::mt19937 rng(static_cast<unsigned>(++s.launches));
  std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const uint3& b : blocks) {
    blockIdx = b;
    run_block(s, rng);
    if (!s.failure.empty()) break;
  }
  s.body = nullptr;
  return s.failure;
}

inline void grant(const void* kernel, size_t bytes) { launch_state().granted[kernel] = bytes; }

inline unsigned char* dynamic_smem() { return launch_state().smem.data(); }

inline void sync_block() { wait_at(Wait::block); }

// This lane's value exchanged with its warp: returns the values of all 32 lanes' slots
// after every lane has written (lanes past the block's end keep zeros). `site` is the
// caller's code address, which every lane must share.
template <typename T>
const uint64_t* exchange(T v, const void* site) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp exchange of a value over 8 bytes");
  Launch& s = launch_state();
  Fiber& f = s.fibers[s.current];
  uint64_t* slots = s.slots.data() + (s.current / 32) * 64 + f.parity * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[s.current % 32] = bits;
  // Two halves alternate so a lane that runs ahead to its next exchange cannot
  // overwrite a slot a slower lane has yet to read.
  f.parity ^= 1;
  wait_at(Wait::warp, site);
  return slots;
}

template <typename T>
T lane_value(const uint64_t* slots, int lane) {
  T v;
  std::memcpy(&v, &slots[lane], sizeof(T));
  return v;
}

inline int lane_id() { return launch_state().current % 32; }

}  // namespace sim
}  // namespace kmem
