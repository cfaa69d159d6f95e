// The interface between the host side of the CUDA ops (ops_cuda.cpp: torch, planning, workspace)
// and the kernels (kernels.cu). Keeping torch's headers out of the .cu keeps nvcc's per-arch
// passes short.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/feature_grid.h"
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
// Blocks per SM feature_stats' grid aims at (feature_grid.h): enough resident threads, each with
// its loads in flight, to cover the memory latency; more blocks would only cut the input into more
// pieces to combine.
constexpr int kFeatureBlocksPerSm = 4;

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

// Launches the kernels of feature_stats on `stream` (features.cuh), on the grid of feature_grid.h:
// the piece kernel, and the combine kernel when there are several pieces, whose partials then go to
// `partials` (feature_workspace_bytes). `data` is contiguous, of `dtype`; `out` is
// [kFeatureRows, features] float64.
void launch_feature_stats(const void* data, DType dtype, const FeatureShape& shape,
                          const FeatureGrid& grid, FeatureAcc* partials, double* out,
                          cudaStream_t stream);

}  // namespace gradstats::gpu
