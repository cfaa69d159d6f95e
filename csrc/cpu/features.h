// CPU kernel of feature_stats (registered by ops_cpu.cpp, which includes this): per-feature
// statistics of one input. The outer dimension is cut into pieces sized by the shape alone
// (feature_stats.h), each piece accumulates its own row of FeatureAcc, and the pieces are combined
// in order: the result is bitwise the same for any number of threads.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "feature_stats.h"

namespace gradstats::cpu {
namespace {

// At most this many pieces, whatever the thread count (so that the result does not depend on it):
// more than any CPU has threads, and few enough that combining them costs little.
constexpr int64_t kCpuFeaturePieces = 1024;

// Rows of one feature per element: the features are the lanes, so that the loop over them runs in
// SIMD registers. Branch-free: a non-finite element adds 0 to the sums and nothing to the extremes.
template <typename T>
void rows_stats(const T* data, int64_t features, int64_t first, int64_t last, FeatureAcc* acc) {
  const double none = -std::numeric_limits<double>::infinity();
  std::vector<double> lanes(static_cast<size_t>(kFeatureRows * features), 0.0);
  double* count = lanes.data() + kFeatCountRow * features;
  double* sum = lanes.data() + kFeatSumRow * features;
  double* sumsq = lanes.data() + kFeatSumSqRow * features;
  double* nan = lanes.data() + kFeatNanRow * features;
  double* inf = lanes.data() + kFeatInfRow * features;
  double* neg_min = lanes.data() + kFeatNegMinRow * features;
  double* max = lanes.data() + kFeatMaxRow * features;
  std::fill(lanes.data() + kFeatAdditiveRows * features, lanes.data() + kFeatureRows * features,
            none);
  for (int64_t o = first; o < last; ++o) {
    const T* row = data + o * features;
    for (int64_t f = 0; f < features; ++f) {
      const double x = static_cast<double>(row[f]);
      // Compares instead of std::isfinite, which keeps the loop vectorisable (NaN compares false).
      const bool finite = std::abs(x) <= std::numeric_limits<double>::max();
      const double kept = finite ? x : 0.0;
      count[f] += finite ? 1.0 : 0.0;
      sum[f] += kept;
      sumsq[f] += kept * kept;
      nan[f] += x != x ? 1.0 : 0.0;
      inf[f] += !finite && x == x ? 1.0 : 0.0;
      neg_min[f] = std::max(neg_min[f], finite ? -x : none);
      max[f] = std::max(max[f], finite ? x : none);
    }
  }
  for (int64_t f = 0; f < features; ++f) {
    acc[f] = FeatureAcc{count[f], sum[f], sumsq[f], nan[f], inf[f], neg_min[f], max[f]};
  }
}

template <typename T>
void piece_stats(const T* data, const FeatureShape& s, int64_t first, int64_t last,
                 FeatureAcc* acc) {
  if (s.inner == 1) return rows_stats(data, s.features, first, last, acc);
  for (int64_t o = first; o < last; ++o) {
    const T* slice = data + o * s.features * s.inner;
    for (int64_t f = 0; f < s.features; ++f) {
      const T* run = slice + f * s.inner;
      for (int64_t i = 0; i < s.inner; ++i) add_value(acc[f], static_cast<double>(run[i]));
    }
  }
}

at::Tensor feature_stats_cpu(const at::Tensor& input, int64_t dim) {
  const FeatureInput in = prepare_feature_input(input, dim);
  const FeatureShape& s = in.shape;
  at::Tensor out = at::empty({kFeatureRows, s.features}, input.options().dtype(at::kDouble));
  const FeaturePieces cut = feature_pieces(s, in.data.element_size(), kCpuFeaturePieces);
  const int64_t pieces = cut.count;
  std::vector<FeatureAcc> partials(static_cast<size_t>(pieces * s.features), empty_feature_acc());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.data.scalar_type(), "feature_stats", [&] {
        const scalar_t* data = in.data.const_data_ptr<scalar_t>();
        at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            piece_stats(data, s, p * cut.rows, std::min(s.outer, (p + 1) * cut.rows),
                        partials.data() + p * s.features);
          }
        });
      });
  double* o = out.data_ptr<double>();
  for (int64_t f = 0; f < s.features; ++f) {
    FeatureAcc acc = empty_feature_acc();
    for (int64_t p = 0; p < pieces; ++p) combine_features(acc, partials[p * s.features + f]);
    store_feature(acc, o, f, s.features);
  }
  return out;
}

}  // namespace
}  // namespace gradstats::cpu
