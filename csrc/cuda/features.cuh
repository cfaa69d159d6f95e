// Kernels of feature_stats (launched by kernels.cu, the one CUDA translation unit). Device code
// only, in a header so that tests/cpp/test_kernels.cpp can also run it on the host.
//
// The piece kernel: each block reads one piece of rows of one tile of features, its threads laid
// as feature_grid.h says (coalesced, no per-element division), and combines its threads' statistics
// of each feature in a fixed tree; with one piece it writes the output, else the piece's row of
// partials. The combine kernel then reduces the pieces' partials of each feature, its threads
// spread across the features and the pieces the same way. Deterministic: the trees and the piece
// order are fixed by the grid, which the shape and the device's SM count fix; no atomics.
#pragma once

#include "cuda/feature_grid.h"
#include "feature_stats.h"

namespace gradstats::gpu {
namespace {

// Rows a thread loads before it adds any of them: several loads in flight per thread hide the
// memory latency without a register array that would not fit.
constexpr int kFeatureLoads = 4;

// Combines the block's accumulators of each feature in a fixed tree, over the lanes of its run,
// then over its rows. Every thread must call it; the thread at lane 0, row 0 of each feature gets
// the feature's result.
__device__ __forceinline__ FeatureAcc reduce_box(const FeatureAcc& acc, const FeatureGrid& g,
                                                 const FeatureLane& at, FeatureAcc* shared) {
  const int t = static_cast<int>(threadIdx.x);
  shared[t] = acc;
  __syncthreads();
  for (int half = g.lanes / 2; half > 0; half /= 2) {
    if (at.lane < half) combine_features(shared[t], shared[t + half]);
    __syncthreads();
  }
  const int row_stride = g.lanes * g.group;
  for (int half = g.rows / 2; half > 0; half /= 2) {
    if (at.lane == 0 && at.row < half) combine_features(shared[t], shared[t + half * row_stride]);
    __syncthreads();
  }
  return shared[t];
}

// Adds the elements of rows [o, last) in steps of `rows`, from p on (the thread's element of row o)
// with row_step elements between rows, in row order.
template <typename T>
__device__ __forceinline__ void add_rows(FeatureAcc& acc, const T* __restrict__ p, int64_t o,
                                         int64_t last, int32_t rows, int64_t row_step) {
  const int64_t batch = int64_t{kFeatureLoads} * rows;
  for (; o + batch - rows < last; o += batch) {
    T v[kFeatureLoads];
#pragma unroll
    for (int k = 0; k < kFeatureLoads; ++k) v[k] = p[k * row_step];
#pragma unroll
    for (int k = 0; k < kFeatureLoads; ++k) add_value(acc, static_cast<double>(v[k]));
    p += kFeatureLoads * row_step;
  }
  for (; o < last; o += rows) {
    add_value(acc, static_cast<double>(*p));
    p += row_step;
  }
}

template <typename T>
__global__ void __launch_bounds__(kFeatureThreads)
    gradstats_feature_piece_kernel(const T* __restrict__ data, const FeatureShape s,
                                   const FeatureGrid g, FeatureAcc* partials, double* out) {
  __shared__ FeatureAcc shared[kFeatureThreads];
  const FeatureLane at = feature_lane(g, static_cast<int32_t>(threadIdx.x));
  const int64_t tile = blockIdx.x % g.tiles;
  const int64_t piece = blockIdx.x / g.tiles;
  const int64_t f = tile * g.group + at.feature;
  const int64_t first = piece * g.pieces.rows + at.row;
  const int64_t last = min(s.outer, (piece + 1) * g.pieces.rows);
  const int64_t slice = s.features * s.inner;
  FeatureAcc acc = empty_feature_acc();
  if (f < s.features) {
    for (int64_t i = at.lane; i < s.inner; i += g.lanes) {
      add_rows(acc, data + first * slice + f * s.inner + i, first, last, g.rows, g.rows * slice);
    }
  }
  acc = reduce_box(acc, g, at, shared);
  if (at.lane != 0 || at.row != 0 || f >= s.features) return;
  if (g.pieces.count == 1) {
    store_feature(acc, out, f, s.features);
  } else {
    partials[piece * s.features + f] = acc;
  }
}

// g: feature_combine_grid, whose rows are the pieces.
__global__ void __launch_bounds__(kFeatureThreads)
    gradstats_feature_combine_kernel(const FeatureAcc* __restrict__ partials, const FeatureShape s,
                                     const FeatureGrid g, double* out) {
  __shared__ FeatureAcc shared[kFeatureThreads];
  const FeatureLane at = feature_lane(g, static_cast<int32_t>(threadIdx.x));
  const int64_t f = int64_t{blockIdx.x} * g.group + at.feature;
  FeatureAcc acc = empty_feature_acc();
  if (f < s.features) {
    for (int64_t p = at.row; p < g.pieces.rows; p += g.rows) {
      combine_features(acc, partials[p * s.features + f]);
    }
  }
  acc = reduce_box(acc, g, at, shared);
  if (at.row == 0 && f < s.features) store_feature(acc, out, f, s.features);
}

}  // namespace
}  // namespace gradstats::gpu
