// Kernels of feature_stats (compiled in kernels.cu, the one CUDA translation unit). Deterministic:
// every (feature, piece) block reduces its elements in a fixed order (each thread a fixed stride,
// then a fixed tree over the block), and the pieces are combined in piece order by a second kernel;
// no atomics.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda/launch.h"

namespace gradstats::gpu {
namespace {

constexpr int kFeatureThreads = 256;
// The largest y dimension of a grid.
constexpr int64_t kMaxGridY = 65535;
// Blocks of the combining kernel hold this many features each.
constexpr int kCombineThreads = 128;

// Block (feature f, y) reduces feature f over the outer slices of pieces y, y + gridDim.y, ...
// (the grid's y dimension holds at most kMaxGridY blocks).
template <typename T>
__global__ void __launch_bounds__(kFeatureThreads)
    gradstats_feature_piece_kernel(const T* __restrict__ data, FeatureShape s, int64_t pieces,
                                   FeatureAcc* partials) {
  __shared__ FeatureAcc shared[kFeatureThreads];
  const int64_t f = blockIdx.x;
  const int64_t per = feature_slices_per_piece(s);
  for (int64_t p = blockIdx.y; p < pieces; p += gridDim.y) {
    const int64_t first = p * per;
    const int64_t last = min(s.outer, first + per);
    const int64_t count = (last - first) * s.inner;
    FeatureAcc acc = empty_feature_acc();
    for (int64_t e = threadIdx.x; e < count; e += kFeatureThreads) {
      const int64_t o = first + e / s.inner;
      const int64_t i = e % s.inner;
      add_value(acc, static_cast<double>(data[(o * s.features + f) * s.inner + i]));
    }
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int half = kFeatureThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) combine_features(shared[threadIdx.x], shared[threadIdx.x + half]);
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[p * s.features + f] = shared[0];
    __syncthreads();  // shared is reused by the next piece
  }
}

__global__ void gradstats_feature_combine_kernel(const FeatureAcc* __restrict__ partials,
                                                 int64_t pieces, int64_t features, double* out) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (f >= features) return;
  FeatureAcc acc = empty_feature_acc();
  for (int64_t p = 0; p < pieces; ++p) combine_features(acc, partials[p * features + f]);
  store_feature(acc, out, f, features);
}

template <typename T>
void launch_pieces(const void* data, const FeatureShape& s, int64_t pieces, FeatureAcc* partials,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(s.features),
                  static_cast<unsigned>(std::min<int64_t>(pieces, kMaxGridY)));
  gradstats_feature_piece_kernel<T>
      <<<grid, kFeatureThreads, 0, stream>>>(static_cast<const T*>(data), s, pieces, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_feature_stats(const void* data, DType dtype, const FeatureShape& shape,
                          FeatureAcc* partials, double* out, cudaStream_t stream) {
  const int64_t pieces = feature_pieces(shape);
  if (pieces > 0) {
    switch (dtype) {
      case DType::kFloat64:
        launch_pieces<double>(data, shape, pieces, partials, stream);
        break;
      case DType::kFloat32:
        launch_pieces<float>(data, shape, pieces, partials, stream);
        break;
      case DType::kFloat16:
        launch_pieces<c10::Half>(data, shape, pieces, partials, stream);
        break;
      case DType::kBFloat16:
        launch_pieces<c10::BFloat16>(data, shape, pieces, partials, stream);
        break;
    }
  }
  const auto blocks =
      static_cast<unsigned>((shape.features + kCombineThreads - 1) / kCombineThreads);
  gradstats_feature_combine_kernel<<<blocks, kCombineThreads, 0, stream>>>(partials, pieces,
                                                                           shape.features, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gradstats::gpu
