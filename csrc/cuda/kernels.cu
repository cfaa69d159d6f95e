// Launches the kernels of kernels.cuh (for the two table sizes) and of features.cuh; the one CUDA
// translation unit.
#include <c10/cuda/CUDAException.h>

#include "cuda/features.cuh"
#include "cuda/kernels.cuh"
#include "cuda/launch.h"

namespace gradstats::gpu {

template <class Table>
void launch_stats(const Table& table, const StatsArgs& args, int grid, cudaStream_t stream) {
  static_assert(sizeof(Table) + sizeof(StatsArgs) <= kMaxParamBytes);
  gradstats_stats_kernel<Table><<<grid, kThreads, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Table>
void launch_scale(const Table& table, const ScaleArgs& args, int grid, cudaStream_t stream) {
  static_assert(sizeof(Table) + sizeof(ScaleArgs) <= kMaxParamBytes);
  gradstats_scale_kernel<Table><<<grid, kThreads, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_feature_pieces(const void* data, const FeatureShape& s, const FeatureGrid& g,
                           FeatureAcc* partials, double* out, cudaStream_t stream) {
  gradstats_feature_piece_kernel<T>
      <<<static_cast<unsigned>(g.blocks()), kFeatureThreads, 0, stream>>>(
          static_cast<const T*>(data), s, g, partials, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_feature_stats(const void* data, DType dtype, const FeatureShape& shape,
                          const FeatureGrid& grid, FeatureAcc* partials, double* out,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat64:
      launch_feature_pieces<double>(data, shape, grid, partials, out, stream);
      break;
    case DType::kFloat32:
      launch_feature_pieces<float>(data, shape, grid, partials, out, stream);
      break;
    case DType::kFloat16:
      launch_feature_pieces<c10::Half>(data, shape, grid, partials, out, stream);
      break;
    case DType::kBFloat16:
      launch_feature_pieces<c10::BFloat16>(data, shape, grid, partials, out, stream);
      break;
  }
  if (grid.pieces.count == 1) return;
  const FeatureGrid combine = feature_combine_grid(shape, grid.pieces);
  gradstats_feature_combine_kernel<<<static_cast<unsigned>(combine.blocks()), kFeatureThreads, 0,
                                     stream>>>(partials, shape, combine, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_stats<SmallTable>(const SmallTable&, const StatsArgs&, int, cudaStream_t);
template void launch_stats<LargeTable>(const LargeTable&, const StatsArgs&, int, cudaStream_t);
template void launch_scale<SmallTable>(const SmallTable&, const ScaleArgs&, int, cudaStream_t);
template void launch_scale<LargeTable>(const LargeTable&, const ScaleArgs&, int, cudaStream_t);

}  // namespace gradstats::gpu
