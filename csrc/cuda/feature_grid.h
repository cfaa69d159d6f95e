// How the CUDA kernels of feature_stats (features.cuh) lay their threads over an input seen as
// [outer, features, inner] (feature_stats.h). Plain C++ (host and device, no CUDA, no torch), so
// that tests/cpp/test_planner.cpp checks it on machines without a GPU.
//
// A block's kFeatureThreads threads form a [rows, group, lanes] box (each a power of two): `lanes`
// threads along a feature's run of `inner` contiguous elements, `group` consecutive features, and
// `rows` threads along the outer rows. So a warp reads contiguous memory: consecutive features of a
// row when inner is 1 (as the CPU's rows_stats), consecutive elements of a run otherwise, and no
// element's index is divided: each thread walks rows and runs with strides. Blocks are laid as
// [pieces, tiles]: tile t covers features [t * group, (t + 1) * group), piece p the rows of piece
// p.
#pragma once

#include <cstdint>

#include "feature_stats.h"

namespace gradstats::gpu {

// Threads of a feature_stats block.
constexpr int kFeatureThreads = 256;

struct FeatureGrid {
  int32_t lanes;  // threads along a feature's inner run
  int32_t group;  // features of a block
  int32_t rows;   // threads along the outer rows: lanes * group * rows == kFeatureThreads
  int64_t tiles;  // blocks along the features
  FeaturePieces pieces;

  GS_HD int64_t blocks() const { return tiles * pieces.count; }
};

// The smallest power of two >= n (n >= 1), at most kFeatureThreads.
GS_HD int32_t feature_pow2(int64_t n) {
  int32_t p = 1;
  while (p < n && p < kFeatureThreads) p *= 2;
  return p;
}

// The grid of an input with elements of itemsize bytes, for at most max_blocks blocks where the
// input allows (max_blocks >= 1: a few per SM keep every SM busy; more would only cut the input
// into more pieces to combine). The pieces' count depends on max_blocks: a device's results are
// bitwise reproducible on that device.
GS_HD FeatureGrid feature_grid(const FeatureShape& s, int64_t itemsize, int64_t max_blocks) {
  FeatureGrid g{};
  g.lanes = feature_pow2(s.inner);
  g.group = feature_pow2(s.features);
  if (g.group > kFeatureThreads / g.lanes) g.group = kFeatureThreads / g.lanes;
  g.rows = kFeatureThreads / (g.lanes * g.group);
  g.tiles = ceil_div(s.features, g.group);
  const int64_t max_pieces = max_blocks / g.tiles;
  g.pieces = feature_pieces(s, itemsize, max_pieces > 1 ? max_pieces : 1);
  return g;
}

// Where thread t of a block sits in its box.
struct FeatureLane {
  int32_t lane;     // along the run
  int32_t feature;  // within the block's group
  int32_t row;      // along the rows
};

GS_HD FeatureLane feature_lane(const FeatureGrid& g, int32_t t) {
  return FeatureLane{t % g.lanes, (t / g.lanes) % g.group, t / (g.lanes * g.group)};
}

// The combining kernel's grid: the pieces' partials read as an input of `pieces` rows of features
// with no inner run (one FeatureAcc per element), in one piece.
GS_HD FeatureGrid feature_combine_grid(const FeatureShape& s, const FeaturePieces& pieces) {
  FeatureGrid g{};
  g.lanes = 1;
  g.group = feature_pow2(s.features);
  g.rows = kFeatureThreads / g.group;
  g.tiles = ceil_div(s.features, g.group);
  g.pieces = FeaturePieces{pieces.count, 1};
  return g;
}

}  // namespace gradstats::gpu
