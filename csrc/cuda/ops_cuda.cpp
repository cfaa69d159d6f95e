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
#include <memory>
#include <vector>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/planner.h"

namespace gradstats::gpu {
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
std::vector<TensorDesc> describe(const std::vector<at::Tensor>& tensors, const char* op) {
  std::vector<TensorDesc> descs;
  descs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t empty[] = {0};
    Layout layout;
    if (is_walkable(t)) {
      layout = tensor_layout(t, static_cast<int64_t>(i), op);
    } else {
      make_layout(empty, empty, 1, layout);
    }
    descs.push_back(TensorDesc{reinterpret_cast<uint64_t>(t.data_ptr()),
                               static_cast<int32_t>(t.element_size()), dtype_tag(t.scalar_type()),
                               layout});
  }
  return descs;
}

// Plans a call with the small table when one small launch holds it, else with large tables, and
// calls run(table, k, plan) for each launch k of the plan, in order.
template <typename Run>
void plan_and_run(const std::vector<TensorDesc>& descs, Run&& run) {
  const auto run_all = [&](auto table, const CallPlan& plan) {
    for (size_t k = 0; k < plan.launches.size(); ++k) {
      pack_launch(descs, plan.launches[k], *table);
      run(*table, k, plan);
    }
  };
  const CallPlan small = plan_call(descs, SmallTable::kCapacity, SmallTable::kDimCapacity);
  if (small.launches.size() == 1) {
    run_all(std::make_unique<SmallTable>(), small);
  } else {
    run_all(std::make_unique<LargeTable>(),
            plan_call(descs, LargeTable::kCapacity, LargeTable::kDimCapacity));
  }
}

// Everything the stats kernels write besides the outputs: one Partial per chunk and per tensor,
// and one counter of finished blocks per launch.
struct Workspace {
  at::Tensor storage;
  Partial* chunk_partials;
  Partial* tensor_partials;
  unsigned int* done_blocks;
};

Workspace make_workspace(const at::Tensor& like, int64_t chunks, int64_t tensors,
                         int64_t launches) {
  const auto partial_bytes = static_cast<int64_t>(sizeof(Partial));
  const int64_t bytes =
      (chunks + tensors) * partial_bytes + launches * static_cast<int64_t>(sizeof(unsigned int));
  Workspace ws;
  ws.storage = at::empty({bytes}, like.options().dtype(at::kByte));
  auto* base = static_cast<uint8_t*>(ws.storage.data_ptr());
  ws.chunk_partials = reinterpret_cast<Partial*>(base);
  ws.tensor_partials = ws.chunk_partials + chunks;
  ws.done_blocks = reinterpret_cast<unsigned int*>(ws.tensor_partials + tensors);
  return ws;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_cuda(at::TensorList tensor_list,
                                                                      double norm_type,
                                                                      double max_norm,
                                                                      c10::string_view on_nonfinite,
                                                                      bool wide) {
  const std::vector<at::Tensor> tensors = prepare_tensors(tensor_list, "stats", /*write=*/false);
  const NormSpec spec = parse_norm_type(norm_type);
  parse_max_norm(max_norm);
  const Nonfinite policy = parse_nonfinite(on_nonfinite);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const c10::DeviceIndex device = tensors[0].device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const std::vector<TensorDesc> descs = describe(tensors, "stats");
  const StatsOutputs out = allocate_stats_outputs(tensors, wide);
  const auto n = static_cast<int64_t>(tensors.size());

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

  Workspace ws;
  plan_and_run(descs, [&](const auto& table, size_t k, const CallPlan& plan) {
    const auto launches = static_cast<int64_t>(plan.launches.size());
    if (k == 0) {
      ws = make_workspace(tensors[0], plan.num_chunks, n, launches);
      // The counters start at zero in every call (and every graph replay); a memset is no kernel.
      C10_CUDA_CHECK(cudaMemsetAsync(ws.done_blocks, 0, launches * sizeof(unsigned int), stream));
    }
    args.chunk_partials = ws.chunk_partials;
    args.tensor_partials = ws.tensor_partials;
    args.done_blocks = ws.done_blocks + k;
    args.last_launch = static_cast<int64_t>(k) + 1 == launches;
    launch_stats(table, args, grid_size(plan.launches[k].num_chunks, device), stream);
  });
  return {out.total_norm, out.clip_coef, out.norms, out.counts};
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

void scale_cuda(at::TensorList tensor_list, const at::Tensor& coef_tensor,
                const std::optional<at::Tensor>& zero_nonfinite) {
  const std::vector<at::Tensor> tensors = prepare_tensors(tensor_list, "scale_", /*write=*/true);
  const std::optional<at::Tensor> counts = check_scale_args(tensors, coef_tensor, zero_nonfinite);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const c10::DeviceIndex device = tensors[0].device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const at::Tensor coef = readable_coef(coef_tensor);

  ScaleArgs args{};
  args.coef = coef.data_ptr();
  args.coef_dtype = dtype_tag(coef.scalar_type());
  args.zero_counts = counts ? counts->data_ptr<int64_t>() : nullptr;
  args.zero_stride = counts ? counts->stride(0) : 0;
  plan_and_run(describe(tensors, "scale_"), [&](const auto& table, size_t k, const CallPlan& plan) {
    const int64_t chunks = plan.launches[k].num_chunks;
    if (chunks > 0) launch_scale(table, args, grid_size(chunks, device), stream);
  });
  scale_unwalkable(tensors, coef, counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("stats", &stats_cuda);
  m.impl("scale_", &scale_cuda);
}

}  // namespace gradstats::gpu

#endif  // GRADSTATS_WITH_CUDA
