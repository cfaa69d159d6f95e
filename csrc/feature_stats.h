// What the CPU and CUDA kernels of feature_stats share: the statistics of one feature (one index of
// the feature dimension) over a piece of an input, how pieces combine in a fixed order, and where
// each statistic goes in the output. Plain C++ (host and device), no torch dependency.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "partial.h"

namespace gradstats {

// Rows of feature_stats' output, float64 [kFeatureRows, F]. The additive rows come first and the
// extremes last, the smallest stored as -min, so that the statistics of several calls (several
// forwards in one step) combine with one add and one maximum.
constexpr int64_t kFeatureRows = 7;
constexpr int64_t kFeatCountRow = 0;   // finite elements
constexpr int64_t kFeatSumRow = 1;     // sum of the finite elements
constexpr int64_t kFeatSumSqRow = 2;   // sum of their squares (Inf only for |x| > 1e154)
constexpr int64_t kFeatNanRow = 3;     // NaN elements
constexpr int64_t kFeatInfRow = 4;     // +-Inf elements
constexpr int64_t kFeatNegMinRow = 5;  // -(smallest finite element), -inf when there is none
constexpr int64_t kFeatMaxRow = 6;     // largest finite element, -inf when there is none
constexpr int64_t kFeatAdditiveRows = 5;
// The rows' names, in order (gradstats.ops.FEATURE_ROWS).
constexpr const char* kFeatureRowNames[kFeatureRows] = {"count", "sum",     "sumsq", "nan",
                                                        "inf",   "neg_min", "max"};

// One feature's statistics over a piece, in float64 (counts are exact below 2^53 elements).
struct FeatureAcc {
  double count;
  double sum;
  double sumsq;
  double nan;
  double inf;
  double neg_min;
  double max;
};

GS_HD FeatureAcc empty_feature_acc() {
  const double none = -std::numeric_limits<double>::infinity();
  return FeatureAcc{0.0, 0.0, 0.0, 0.0, 0.0, none, none};
}

GS_HD void add_value(FeatureAcc& acc, double x) {
  if (std::isnan(x)) {
    acc.nan += 1.0;
  } else if (std::isinf(x)) {
    acc.inf += 1.0;
  } else {
    acc.count += 1.0;
    acc.sum += x;
    acc.sumsq += x * x;
    acc.neg_min = fmax(acc.neg_min, -x);
    acc.max = fmax(acc.max, x);
  }
}

// acc += other; pieces are combined in piece order, so the result does not depend on threads.
GS_HD void combine_features(FeatureAcc& acc, const FeatureAcc& other) {
  acc.count += other.count;
  acc.sum += other.sum;
  acc.sumsq += other.sumsq;
  acc.nan += other.nan;
  acc.inf += other.inf;
  acc.neg_min = fmax(acc.neg_min, other.neg_min);
  acc.max = fmax(acc.max, other.max);
}

// Writes feature f's statistics into column f of the [kFeatureRows, features] output.
GS_HD void store_feature(const FeatureAcc& acc, double* out, int64_t f, int64_t features) {
  out[kFeatCountRow * features + f] = acc.count;
  out[kFeatSumRow * features + f] = acc.sum;
  out[kFeatSumSqRow * features + f] = acc.sumsq;
  out[kFeatNanRow * features + f] = acc.nan;
  out[kFeatInfRow * features + f] = acc.inf;
  out[kFeatNegMinRow * features + f] = acc.neg_min;
  out[kFeatMaxRow * features + f] = acc.max;
}

// An input seen as [outer, features, inner] (contiguous): element (o, f, i) is at
// (o * features + f) * inner + i. The kernels cut the outer dimension into pieces of whole
// [features, inner] slices (rows), each piece's statistics a row of FeatureAcc in a workspace, then
// combine the pieces in piece order.
struct FeatureShape {
  int64_t outer;
  int64_t features;
  int64_t inner;
};

// A piece holds at least this many elements (or one whole slice): enough work per piece that
// cutting costs little next to reading.
constexpr int64_t kFeaturePieceElems = int64_t{1} << 16;
// A piece holds enough rows that its partials (features x sizeof(FeatureAcc) bytes) take at most
// 1/kFeatureInputPerPartial of its input's bytes. Then a cut into several pieces needs a workspace
// of at most 2 x input / kFeatureInputPerPartial (the last piece may be short, so pieces <= 2 x
// (pieces - 1) <= 2 x full pieces): a quarter of the input. A single piece needs none.
constexpr int64_t kFeatureInputPerPartial = 8;

// How an input is cut: `count` pieces of `rows` rows, the last one shorter; at least one piece
// (an empty one when the input has no elements), so that every feature gets its statistics.
struct FeaturePieces {
  int64_t rows;
  int64_t count;
};

GS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pieces of at least kFeaturePieceElems elements and of at least the rows that bound the workspace
// (kFeatureInputPerPartial), and at most max_pieces of them (max_pieces >= 1). Depends on the
// shape, the element size and max_pieces alone, so that the combination order, and with it every
// bit of the result, does too.
GS_HD FeaturePieces feature_pieces(const FeatureShape& s, int64_t itemsize, int64_t max_pieces) {
  const int64_t slice = s.features * s.inner;
  if (slice == 0 || s.outer == 0) return FeaturePieces{1, 1};  // nothing to read: one empty piece
  int64_t rows = slice >= kFeaturePieceElems ? 1 : kFeaturePieceElems / slice;
  const int64_t row_bytes = s.inner * itemsize;  // one feature's bytes in one row
  const int64_t bounded =
      ceil_div(kFeatureInputPerPartial * static_cast<int64_t>(sizeof(FeatureAcc)), row_bytes);
  rows = rows > bounded ? rows : bounded;
  if (ceil_div(s.outer, rows) > max_pieces) rows = ceil_div(s.outer, max_pieces);
  return FeaturePieces{rows, ceil_div(s.outer, rows)};
}

// Bytes of the workspace a cut needs: the pieces' partials, none for a single piece (whose
// statistics go straight to the output).
GS_HD int64_t feature_workspace_bytes(const FeatureShape& s, const FeaturePieces& pieces) {
  return pieces.count > 1 ? pieces.count * s.features * static_cast<int64_t>(sizeof(FeatureAcc))
                          : 0;
}

}  // namespace gradstats
