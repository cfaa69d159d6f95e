// The interface between the host side of the CUDA ops (ops_cuda.cpp: torch, planning, workspace)
// and the kernels (kernels.cu). Keeping torch's headers out of the .cu keeps nvcc's per-arch
// passes short.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/planner.h"
#include "feature_stats.h"
#include "partial.h"

namespace gradstats::gpu {

// Threads per block: eight warps share a chunk's reduction.
constexpr int kThreads = 256;
// Resident blocks per SM the kernels are built for (__launch_bounds__): 1024 threads keep enough
// 16-byte loads in flight to cover the memory latency while a block reduces its chunk, and leave
// each thread 64 registers.
constexpr int kBlocksPerSm = 4;

// Arguments of the statistics kernel besides its tensor table.
struct StatsArgs {
  Partial* chunk_partials;   // the call's workspace: one Partial per chunk, in chunk order
  Partial* tensor_partials;  // one Partial per tensor of the call
  // stats_counters(n) counters, zeroed before the call's first launch (by a memset, which a CUDA
  // graph replays too): one per tensor of the call (its chunks finished so far), then the last
  // launch's blocks finished so far.
  unsigned int* counters;
  void* norms;  // [n] of the output dtype (float, or double when out_double)
  void* total_norm;
  void* clip_coef;
  int64_t* counts;      // [3, n + 1]
  int64_t num_tensors;  // n, of the call
  double max_norm;
  NormSpec spec;
  Nonfinite policy;
  bool out_double;
  bool last_launch;  // the launch whose last block writes the totals
};

// The counters of a call of n tensors (StatsArgs::counters).
GS_HD int64_t stats_counters(int64_t tensors) { return tensors + 1; }

// Arguments of the scale kernel besides its tensor table.
struct ScaleArgs {
  const void* coef;            // one value of coef_dtype, read on the device
  const int64_t* zero_counts;  // per-tensor non-finite counts of the call, or null
  int64_t zero_stride;         // in elements
  DType coef_dtype;
};

static_assert(sizeof(StatsArgs) <= kArgsParamBytes && sizeof(ScaleArgs) <= kArgsParamBytes,
              "the planner reserves kArgsParamBytes of kernel parameters for these");

// Launch one planned launch on `stream` and check the launch. Defined for SmallTable and
// LargeTable (kernels.cu).
template <class Table>
void launch_stats(const Table& table, const StatsArgs& args, int grid, cudaStream_t stream);
template <class Table>
void launch_scale(const Table& table, const ScaleArgs& args, int grid, cudaStream_t stream);

// Launches the two kernels of feature_stats on `stream`: one block per (feature, piece) writes the
// piece's statistics to `partials` ([pieces, features]), then one thread per feature combines them
// in piece order into `out` ([kFeatureRows, features] float64). `data` is contiguous, of `dtype`.
void launch_feature_stats(const void* data, DType dtype, const FeatureShape& shape,
                          FeatureAcc* partials, double* out, cudaStream_t stream);

}  // namespace gradstats::gpu
