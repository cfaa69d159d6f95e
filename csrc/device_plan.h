// A list of tensors of one device, validated and prepared once (checks.h), with what that device's
// kernels precompute from it: the statistics and the in-place scale of the ops run on it. Each op
// call makes one for its own list; a GradPlan (module.cpp) keeps one across training steps, so that
// a step costs no per-tensor checks, planning or dispatcher conversions.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <vector>

#include "checks.h"
#include "partial.h"

namespace gradstats {

class DevicePlan {
 public:
  virtual ~DevicePlan() = default;
  // The stats op on the plan's tensors (arguments already parsed).
  virtual StatsOutputs stats(NormSpec spec, Nonfinite policy, double max_norm, bool wide) const = 0;
  // The scale_ op on the plan's tensors (coef and counts already checked by check_scale_args).
  virtual void scale(const at::Tensor& coef,
                     const std::optional<at::Tensor>& zero_counts) const = 0;
};

// One per device type, in cpu/ and cuda/; `tensors` come from prepare_tensors.
std::unique_ptr<DevicePlan> make_cpu_plan(std::vector<at::Tensor> tensors);
#ifdef GRADSTATS_WITH_CUDA
std::unique_ptr<DevicePlan> make_cuda_plan(std::vector<at::Tensor> tensors);
#endif

// The plan of the tensors' device (all on one device, as prepare_tensors checks).
inline std::unique_ptr<DevicePlan> make_device_plan(std::vector<at::Tensor> tensors) {
#ifdef GRADSTATS_WITH_CUDA
  if (tensors[0].is_cuda()) return make_cuda_plan(std::move(tensors));
#endif
  TORCH_CHECK(tensors[0].is_cpu(), "gradstats: no kernels for tensors on ", tensors[0].device());
  return make_cpu_plan(std::move(tensors));
}

}  // namespace gradstats
