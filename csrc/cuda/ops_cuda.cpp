// Host side of the CUDA ops: the same argument checks and outputs as the CPU kernels (checks.h),
// planning (planner.h), the workspace, and the launches on the current stream. Nothing here waits
// for the device or reads device memory: the coefficient and the counts stay on the GPU, and the
// launch metadata travels in kernel parameters, so the ops can be captured in a CUDA graph.
#ifdef GRADSTATS_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <memory>
#include <vector>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/planner.h"
#include "device_plan.h"

namespace gradstats {
namespace gpu {
namespace {

// SMs of a device, asked once per device (an attribute query, not a synchronisation).
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  std::atomic<int>& slot = cache.at(device);
  int count = slot.load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    slot.store(count, std::memory_order_relaxed);
  }
  return count;
}

// A persistent grid: every chunk gets a block until the SMs are full, then blocks take several.
int grid_size(int64_t chunks, c10::DeviceIndex device) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(chunks, int64_t{sm_count(device)} * kBlocksPerSm)));
}

// The planner's view of the tensors. A tensor the kernels cannot walk (only scale_ is handed
// any: stats reads them through contiguous copies) is described as empty, so that it keeps its
// place in the list (the zeroing counts are indexed by it) and scale_unwalkable does it.
std::vector<TensorDesc> describe(const std::vector<at::Tensor>& tensors) {
  std::vector<TensorDesc> descs;
  descs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t empty[] = {0};
    Layout layout;
    if (is_walkable(t)) {
      layout = tensor_layout(t, static_cast<int64_t>(i), "gradstats");
    } else {
      make_layout(empty, empty, 1, layout);
    }
    descs.push_back(
        TensorDesc{reinterpret_cast<uint64_t>(t.data_ptr()), dtype_tag(t.scalar_type()), layout});
  }
  return descs;
}

// Everything the stats kernels write besides the outputs: one Partial per chunk and per tensor,
// and the call's counters (launch.h stats_counters).
struct Workspace {
  at::Tensor storage;
  Partial* chunk_partials;
  Partial* tensor_partials;
  unsigned int* counters;
  int64_t counter_bytes;
};

Workspace make_workspace(c10::Device device, int64_t chunks, int64_t tensors) {
  const auto partial_bytes = static_cast<int64_t>(sizeof(Partial));
  Workspace ws;
  ws.counter_bytes = stats_counters(tensors) * static_cast<int64_t>(sizeof(unsigned int));
  const int64_t bytes = (chunks + tensors) * partial_bytes + ws.counter_bytes;
  ws.storage = at::empty({bytes}, at::TensorOptions().device(device).dtype(at::kByte));
  auto* base = static_cast<uint8_t*>(ws.storage.data_ptr());
  ws.chunk_partials = reinterpret_cast<Partial*>(base);
  ws.tensor_partials = ws.chunk_partials + chunks;
  ws.counters = reinterpret_cast<unsigned int*>(ws.tensor_partials + tensors);
  return ws;
}

// The coefficient as the kernel reads it: one of the four element types (others converted on
// the device, without a sync).
at::Tensor readable_coef(const at::Tensor& coef) {
  switch (coef.scalar_type()) {
    case at::kDouble:
    case at::kFloat:
    case at::kHalf:
    case at::kBFloat16:
      return coef;
    default:
      return coef.to(at::kDouble);
  }
}

// The plan of a list: its launches, with the small table when one small launch holds it, else with
// large tables, each table packed once.
class CudaPlan final : public DevicePlan {
 public:
  explicit CudaPlan(std::vector<at::Tensor> tensors) : DevicePlan(std::move(tensors)) {
    const std::vector<TensorDesc> descs = describe(tensors_);
    plan_ = plan_call(descs, SmallTable::kCapacity, SmallTable::kDimCapacity);
    if (plan_.launches.size() == 1) {
      pack(descs, small_);
    } else {
      plan_ = plan_call(descs, LargeTable::kCapacity, LargeTable::kDimCapacity);
      pack(descs, large_);
    }
  }

  void rebind(const std::vector<uint64_t>& addresses) override {
    for (auto& table : small_) rebind_launch(addresses, *table);
    for (auto& table : large_) rebind_launch(addresses, *table);
  }

  StatsOutputs stats(NormSpec spec, Nonfinite policy, double max_norm, bool wide) const override {
    const c10::cuda::CUDAGuard guard(device_);
    const c10::DeviceIndex device = device_.index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    const StatsOutputs out = allocate(wide);
    const auto n = count_;
    const auto launches = static_cast<int64_t>(plan_.launches.size());

    StatsArgs args{};
    args.norms = out.norms.data_ptr();
    args.total_norm = out.total_norm.data_ptr();
    args.clip_coef = out.clip_coef.data_ptr();
    args.counts = out.counts.data_ptr<int64_t>();
    args.num_tensors = n;
    args.max_norm = max_norm;
    args.spec = spec;
    args.policy = policy;
    args.out_double = out.norms.scalar_type() == at::kDouble;
    const Workspace ws = make_workspace(device_, plan_.num_chunks, n);
    // The counters start at zero in every call (and every graph replay); a memset is no kernel.
    C10_CUDA_CHECK(cudaMemsetAsync(ws.counters, 0, ws.counter_bytes, stream));
    args.chunk_partials = ws.chunk_partials;
    args.tensor_partials = ws.tensor_partials;
    args.counters = ws.counters;
    run_launches([&](const auto& table, size_t k) {
      args.last_launch = static_cast<int64_t>(k) + 1 == launches;
      launch_stats(table, args, grid_size(plan_.launches[k].num_chunks, device), stream);
    });
    return out;
  }

  void scale(const at::Tensor& coef_tensor,
             const std::optional<at::Tensor>& zero_counts) const override {
    const c10::cuda::CUDAGuard guard(device_);
    const c10::DeviceIndex device = device_.index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    const at::Tensor coef = readable_coef(coef_tensor);
    ScaleArgs args{};
    args.coef = coef.data_ptr();
    args.coef_dtype = dtype_tag(coef.scalar_type());
    args.zero_counts = zero_counts ? zero_counts->data_ptr<int64_t>() : nullptr;
    args.zero_stride = zero_counts ? zero_counts->stride(0) : 0;
    run_launches([&](const auto& table, size_t k) {
      const int64_t chunks = plan_.launches[k].num_chunks;
      if (chunks > 0) launch_scale(table, args, grid_size(chunks, device), stream);
    });
    scale_unwalkable(tensors_, unwalkable_, coef, zero_counts);
  }

 private:
  template <class Table>
  void pack(const std::vector<TensorDesc>& descs, std::vector<std::unique_ptr<Table>>& tables) {
    for (const LaunchPlan& launch : plan_.launches) {
      tables.push_back(std::make_unique<Table>());
      pack_launch(descs, launch, *tables.back());
    }
  }

  // Calls run(table, k) for each launch k, in order.
  template <typename Run>
  void run_launches(Run&& run) const {
    for (size_t k = 0; k < plan_.launches.size(); ++k) {
      if (small_.empty()) {
        run(*large_[k], k);
      } else {
        run(*small_[k], k);
      }
    }
  }

  CallPlan plan_;
  std::vector<std::unique_ptr<SmallTable>> small_;
  std::vector<std::unique_ptr<LargeTable>> large_;
};

at::Tensor feature_stats_cuda(const at::Tensor& input, int64_t dim) {
  const FeatureInput in = prepare_feature_input(input, dim);
  const FeatureShape& s = in.shape;
  const c10::cuda::CUDAGuard guard(input.device());
  const c10::DeviceIndex device = input.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  at::Tensor out = at::empty({kFeatureRows, s.features}, input.options().dtype(at::kDouble));
  const FeatureGrid grid =
      feature_grid(s, in.data.element_size(), int64_t{sm_count(device)} * kFeatureBlocksPerSm);
  TORCH_CHECK(grid.blocks() <= std::numeric_limits<int32_t>::max(),
              "gradstats.feature_stats: ", s.features,
              " features need more blocks than one launch may have");
  // Bounded: none for one piece, at most a quarter of the input's bytes (feature_stats.h).
  const at::Tensor workspace =
      at::empty({feature_workspace_bytes(s, grid.pieces)}, input.options().dtype(at::kByte));
  launch_feature_stats(in.data.const_data_ptr(), dtype_tag(in.data.scalar_type()), s, grid,
                       static_cast<FeatureAcc*>(workspace.data_ptr()), out.data_ptr<double>(),
                       stream);
  return out;
}

}  // namespace
}  // namespace gpu

std::unique_ptr<DevicePlan> make_cuda_plan(std::vector<at::Tensor> tensors) {
  return std::make_unique<gpu::CudaPlan>(std::move(tensors));
}

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("stats", &stats_op);
  m.impl("scale_", &scale_op);
  m.impl("feature_stats", &gpu::feature_stats_cuda);
}

}  // namespace gradstats

#endif  // GRADSTATS_WITH_CUDA
