#include "cuda/planner.h"

#include <string>

namespace gradstats::gpu {

CallPlan plan_call(const std::vector<TensorDesc>& tensors, int capacity, int dim_capacity) {
  if (capacity < 1 || dim_capacity < 2 * kMaxLayoutDims) {
    throw std::invalid_argument(
        "gradstats planner: a launch must hold at least one tensor of any layout; got capacity " +
        std::to_string(capacity) + " and dims pool " + std::to_string(dim_capacity));
  }
  CallPlan plan;
  LaunchPlan launch;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int dims = 2 * table_dims(tensors[i].layout);
    const int64_t chunks = chunk_count(tensors[i].layout.numel);
    if (chunks > kMaxLaunchChunks) {
      throw std::invalid_argument("gradstats planner: tensor " + std::to_string(i) + " has " +
                                  std::to_string(tensors[i].layout.numel) +
                                  " elements, more than one launch can cover");
    }
    const bool full = launch.num_tensors == capacity || launch.dims + dims > dim_capacity ||
                      launch.num_chunks + chunks > kMaxLaunchChunks;
    if (full) {
      plan.launches.push_back(launch);
      launch = LaunchPlan{};
      launch.first_tensor = static_cast<int32_t>(i);
      launch.first_chunk = plan.num_chunks;
    }
    ++launch.num_tensors;
    launch.dims += dims;
    launch.num_chunks += chunks;
    plan.num_chunks += chunks;
  }
  plan.launches.push_back(launch);
  return plan;
}

void throw_bad_launch(const LaunchPlan& launch, int capacity, int dim_capacity, const char* why) {
  throw std::invalid_argument(
      std::string("gradstats planner: cannot pack the launch of tensors [") +
      std::to_string(launch.first_tensor) + ", " +
      std::to_string(int64_t{launch.first_tensor} + launch.num_tensors) + ") (" +
      std::to_string(launch.num_chunks) + " chunks, " + std::to_string(launch.dims) +
      " dims) into a table of " + std::to_string(capacity) + " tensors and " +
      std::to_string(dim_capacity) + " dims: " + why);
}

}  // namespace gradstats::gpu
