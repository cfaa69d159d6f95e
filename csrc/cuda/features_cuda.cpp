// Host side of the CUDA feature_stats: the same checks and output as the CPU kernel (checks.h), the
// workspace of per-piece partials, and the launches on the current stream. Nothing here waits for
// the device.
#ifdef GRADSTATS_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda/features_launch.h"

namespace gradstats::gpu {
namespace {

at::Tensor feature_stats_cuda(const at::Tensor& input, int64_t dim) {
  const FeatureInput in = prepare_feature_input(input, dim);
  const FeatureShape& s = in.shape;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  at::Tensor out = at::empty({kFeatureRows, s.features}, input.options().dtype(at::kDouble));
  const int64_t bytes = std::max<int64_t>(1, feature_pieces(s) * s.features) *
                        static_cast<int64_t>(sizeof(FeatureAcc));
  const at::Tensor workspace = at::empty({bytes}, input.options().dtype(at::kByte));
  launch_feature_stats(in.data.const_data_ptr(), dtype_tag(in.data.scalar_type()), s,
                       static_cast<FeatureAcc*>(workspace.data_ptr()), out.data_ptr<double>(),
                       stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) { m.impl("feature_stats", &feature_stats_cuda); }

}  // namespace gradstats::gpu

#endif  // GRADSTATS_WITH_CUDA
