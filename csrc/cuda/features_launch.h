// The interface between the host side of the CUDA feature_stats (features_cuda.cpp) and its
// kernels (features.cu), which see no torch header.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "feature_stats.h"

namespace gradstats::gpu {

// Launches the two kernels of feature_stats on `stream`: one block per (feature, piece) writes the
// piece's statistics to `partials` ([pieces, features]), then one thread per feature combines them
// in piece order into `out` ([kFeatureRows, features] float64). `data` is contiguous, of `dtype`.
void launch_feature_stats(const void* data, DType dtype, const FeatureShape& shape,
                          FeatureAcc* partials, double* out, cudaStream_t stream);

}  // namespace gradstats::gpu
