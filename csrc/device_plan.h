// A list of tensors of one device, validated and prepared once (checks.h), with what that device's
// kernels precompute from it: the statistics and the in-place scale of the ops run on it. Each op
// call makes one for its own list; a GradPlan (module.cpp) keeps one across training steps, so that
// a step costs no per-tensor checks, planning or dispatcher conversions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "partial.h"

namespace gradstats {

class DevicePlan {
 public:
  explicit DevicePlan(std::vector<at::Tensor> tensors)
      : tensors_(std::move(tensors)),
        device_(tensors_[0].device()),
        count_(static_cast<int64_t>(tensors_.size())),
        narrow_dtype_(norm_dtype(tensors_, /*wide=*/false)),
        unwalkable_(unwalkable(tensors_)) {}
  virtual ~DevicePlan() = default;
  // Lets go of the tensors, for a plan kept between calls (a GradPlan's): the plan itself holds
  // their addresses and layouts, and its owner makes sure they are unchanged and alive at each
  // call. Holding them would keep a step's gradients in memory after zero_grad(set_to_none=True).
  // Only for tensors the kernels walk: scale_unwalkable needs the tensors themselves.
  void release_tensors() {
    TORCH_CHECK(unwalkable_.empty(), "gradstats: a plan with unwalkable tensors must keep them");
    tensors_.clear();
  }
  // Points the plan at where its tensors' elements are now: addresses[i] is the first element of
  // tensor i (the same layout as planned; a GradPlan has just verified that). The op path plans
  // the tensors it is given and never needs it.
  virtual void rebind(const std::vector<uint64_t>& addresses) = 0;
  // The stats op on the plan's tensors (arguments already parsed).
  virtual StatsOutputs stats(NormSpec spec, Nonfinite policy, double max_norm, bool wide) const = 0;
  // The scale_ op on the plan's tensors (coef and counts already checked by check_scale_args).
  virtual void scale(const at::Tensor& coef,
                     const std::optional<at::Tensor>& zero_counts) const = 0;
  c10::Device device() const { return device_; }
  at::ScalarType narrow_dtype() const { return narrow_dtype_; }
  int64_t count() const { return count_; }

 protected:
  StatsOutputs allocate(bool wide) const {
    return allocate_stats_outputs(device_, count_, wide ? at::kDouble : narrow_dtype_);
  }

  std::vector<at::Tensor> tensors_;  // alive while the plan is used, unless released
  c10::Device device_;
  int64_t count_;                    // tensors in the list
  at::ScalarType narrow_dtype_;      // of the norms when not wide (norm_dtype)
  std::vector<int64_t> unwalkable_;  // positions scale_unwalkable takes care of
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

// The stats and scale_ ops, the same on every device: the shared checks, then the list's plan.
// cpu/ and cuda/ register them for their dispatch keys.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_op(
    at::TensorList tensor_list, double norm_type, double max_norm, c10::string_view on_nonfinite,
    bool wide) {
  std::vector<at::Tensor> tensors = prepare_tensors(tensor_list, "stats", /*write=*/false);
  const NormSpec spec = parse_norm_type(norm_type);
  parse_max_norm(max_norm);
  const Nonfinite policy = parse_nonfinite(on_nonfinite);
  const StatsOutputs out =
      make_device_plan(std::move(tensors))->stats(spec, policy, max_norm, wide);
  return {out.total_norm, out.clip_coef, out.norms, out.counts};
}

inline void scale_op(at::TensorList tensor_list, const at::Tensor& coef,
                     const std::optional<at::Tensor>& zero_nonfinite) {
  std::vector<at::Tensor> tensors = prepare_tensors(tensor_list, "scale_", /*write=*/true);
  const std::optional<at::Tensor> counts = check_scale_args(
      tensors[0].device(), static_cast<int64_t>(tensors.size()), coef, zero_nonfinite);
  make_device_plan(std::move(tensors))->scale(coef, counts);
}

}  // namespace gradstats
