// CPU kernel of feature_stats: per-feature statistics of one input. The outer dimension is cut into
// pieces of a fixed size (feature_stats.h), each piece accumulates its own row of FeatureAcc, and
// the pieces are combined in order: the result is bitwise the same for any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "feature_stats.h"

namespace gradstats::cpu {
namespace {

template <typename T>
void piece_stats(const T* data, const FeatureShape& s, int64_t first, int64_t last,
                 FeatureAcc* acc) {
  for (int64_t o = first; o < last; ++o) {
    const T* slice = data + o * s.features * s.inner;
    if (s.inner == 1) {
      // Tabular and sequence inputs: a row holds one value of every feature.
      for (int64_t f = 0; f < s.features; ++f) add_value(acc[f], static_cast<double>(slice[f]));
      continue;
    }
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
  const int64_t per = feature_slices_per_piece(s);
  const int64_t pieces = feature_pieces(s);
  std::vector<FeatureAcc> partials(static_cast<size_t>(pieces * s.features), empty_feature_acc());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.data.scalar_type(), "feature_stats", [&] {
        const scalar_t* data = in.data.const_data_ptr<scalar_t>();
        at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            piece_stats(data, s, p * per, std::min(s.outer, (p + 1) * per),
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

TORCH_LIBRARY_IMPL(gradstats, CPU, m) { m.impl("feature_stats", &feature_stats_cpu); }

}  // namespace gradstats::cpu
