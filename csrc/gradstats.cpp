// The one place that declares the gradstats ops (their schemas), and the pybind11 module
// gradstats._C that loads them, reports how it was built and does the per-tensor bookkeeping that
// costs ~100 ns a tensor in Python. Kernels live in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

namespace py = pybind11;

TORCH_LIBRARY(gradstats, m) {
  // One pass over every tensor (all of one device, any mix of floating dtypes): per-tensor norms
  // and NaN/Inf counts, the total norm and the clip coefficient min(1, max_norm / (total + 1e-6)).
  // counts is int64 [3, n + 1]: rows NaN, Inf, NaN + Inf; column n holds the totals.
  // on_nonfinite: "propagate" | "skip" | "zero" (see csrc/stats.h, Nonfinite).
  m.def(
      "stats(Tensor[] tensors, float norm_type, float max_norm, str on_nonfinite) -> "
      "(Tensor total_norm, Tensor clip_coef, Tensor norms, Tensor counts)");
  // tensors *= coef in place, coef read on the device; nothing is read or written when coef >= 1.
  // With zero_nonfinite (per-tensor non-finite counts), the NaN/Inf elements of the tensors whose
  // count is positive are set to 0.
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef, Tensor? zero_nonfinite=None) -> ()");
}

namespace {

// The defined .grad of each parameter, in order (what torch.nn.utils collects in Python).
std::vector<at::Tensor> collect_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const at::Tensor& p : params) {
    const at::Tensor& g = p.grad();
    if (g.defined()) grads.push_back(g);
  }
  return grads;
}

// Indices of the tensors on each device, devices in order of first appearance.
std::vector<std::vector<int64_t>> device_groups(const std::vector<at::Tensor>& tensors) {
  std::vector<c10::Device> devices;
  std::vector<std::vector<int64_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const c10::Device d = tensors[i].device();
    size_t k = 0;
    while (k < devices.size() && devices[k] != d) ++k;
    if (k == devices.size()) {
      devices.push_back(d);
      groups.emplace_back();
    }
    groups[k].push_back(static_cast<int64_t>(i));
  }
  return groups;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradstats native ops (registered as torch.ops.gradstats) and build information";
  m.def("build_info", [] {
    py::dict info;
    info["torch"] = GRADSTATS_TORCH_VERSION;
    info["cuda"] = GRADSTATS_CUDA_VERSION;
#ifdef GRADSTATS_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    info["cpu_isa"] = GRADSTATS_CPU_ISA;
    return info;
  });
  m.def("collect_grads", &collect_grads, "the defined .grad of each parameter");
  m.def("device_groups", &device_groups, "indices of the tensors on each device");
}
