// Runs CUDA device code on the host, for tests on machines without a GPU: the CUDA keywords are
// defined away, the threads of a block are fibers (ucontext) of one OS thread that meet at
// barriers for __syncthreads and warp shuffles, and the blocks of a grid run one after another
// (so the last block to finish is the last block). Enough for the kernels of csrc/cuda, not a
// general CUDA emulator.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

struct HostDim3 {
  unsigned x = 0;
  unsigned y = 1;
  unsigned z = 1;
};
inline HostDim3 threadIdx;
inline HostDim3 blockIdx;
inline HostDim3 gridDim;

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
// Function-scope shared variables become statics: one for all threads of the (one running) block.
#define __shared__ static
#define __launch_bounds__(...)
#define __builtin_assume(condition) static_cast<void>(condition)
#define __isGlobal(pointer) (static_cast<void>(pointer), true)
#define __isShared(pointer) (static_cast<void>(pointer), true)

using std::fabs;
using std::fma;
using std::fmax;
using std::isfinite;
using std::min;

namespace host_cuda {

constexpr unsigned kWarpSize = 32;
constexpr size_t kShuffleBytes = 8;        // the widest value a shuffle moves
constexpr size_t kStackBytes = 64 * 1024;  // each thread's stack: the kernels need a few KB

struct Barrier {
  unsigned participants;
  unsigned arrived = 0;
  unsigned generation = 0;
};

struct Thread {
  ucontext_t context;
  char* stack;
  bool done = false;
};

// Stacks for the threads of a block, allocated once (uninitialised) and reused by every block.
inline char* stack_of(unsigned thread) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= thread) stacks.emplace_back(new char[kStackBytes]);
  return stacks[thread].get();
}

struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  Barrier sync;
  std::vector<Barrier> warp_sync;
  std::vector<std::array<unsigned char[kShuffleBytes], kWarpSize>> warp_slots;
  std::function<void()> kernel;
  unsigned running = 0;
};

inline Block* current = nullptr;

// Back to the scheduler, which resumes the threads in turn.
inline void yield() {
  swapcontext(&current->threads[current->running].context, &current->scheduler);
}

inline void arrive_and_wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.participants) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline void thread_main() {
  current->kernel();
  current->threads[current->running].done = true;
  swapcontext(&current->threads[current->running].context, &current->scheduler);
}

// Runs block `b` of kernel() with `threads` threads, as fibers resumed in turn until all are done.
inline void run_block(unsigned b, unsigned threads, const std::function<void()>& kernel) {
  Block block;
  block.kernel = kernel;
  block.sync.participants = threads;
  block.warp_sync.assign(threads / kWarpSize, Barrier{kWarpSize});
  block.warp_slots.resize(threads / kWarpSize);
  block.threads.resize(threads);
  current = &block;
  blockIdx.x = b;
  for (unsigned t = 0; t < threads; ++t) {
    Thread& thread = block.threads[t];
    thread.stack = stack_of(t);
    getcontext(&thread.context);
    thread.context.uc_stack.ss_sp = thread.stack;
    thread.context.uc_stack.ss_size = kStackBytes;
    thread.context.uc_link = nullptr;
    makecontext(&thread.context, thread_main, 0);
  }
  for (bool busy = true; busy;) {
    busy = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (block.threads[t].done) continue;
      busy = true;
      block.running = t;
      threadIdx.x = t;
      swapcontext(&block.scheduler, &block.threads[t].context);
    }
  }
  current = nullptr;
}

// Runs kernel() as `grid` blocks of `threads` threads each, one block after another: in index order
// when order_seed is 0, else in an order shuffled by it (a GPU runs its blocks in any order, and
// the last block to finish, which the kernels' counters find, may be any of them).
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& kernel,
                   unsigned order_seed = 0) {
  gridDim.x = grid;
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  if (order_seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(order_seed));
  for (unsigned b : order) run_block(b, threads, kernel);
}

}  // namespace host_cuda

inline void __syncthreads() { host_cuda::arrive_and_wait(host_cuda::current->sync); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_down_sync(unsigned, T value, int offset) {
  static_assert(sizeof(T) <= host_cuda::kShuffleBytes);
  const unsigned warp = threadIdx.x / host_cuda::kWarpSize;
  const unsigned lane = threadIdx.x % host_cuda::kWarpSize;
  auto& slots = host_cuda::current->warp_slots[warp];
  std::memcpy(slots[lane], &value, sizeof(T));
  host_cuda::arrive_and_wait(host_cuda::current->warp_sync[warp]);
  const unsigned source = lane + offset < host_cuda::kWarpSize ? lane + offset : lane;
  T result;
  std::memcpy(&result, slots[source], sizeof(T));
  host_cuda::arrive_and_wait(host_cuda::current->warp_sync[warp]);
  return result;
}

template <class T>
T __ldcg(const T* p) {
  return *p;
}

inline unsigned atomicAdd(unsigned* p, unsigned value) {
  const unsigned old = *p;
  *p = old + value;
  return old;
}
