// Launches the kernels of kernels.cuh for the two table sizes; the one CUDA translation unit.
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

template void launch_stats<SmallTable>(const SmallTable&, const StatsArgs&, int, cudaStream_t);
template void launch_stats<LargeTable>(const LargeTable&, const StatsArgs&, int, cudaStream_t);
template void launch_scale<SmallTable>(const SmallTable&, const ScaleArgs&, int, cudaStream_t);
template void launch_scale<LargeTable>(const LargeTable&, const ScaleArgs&, int, cudaStream_t);

}  // namespace gradstats::gpu
