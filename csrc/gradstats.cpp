// The one place that declares the gradstats ops (their schemas), and the pybind11 module
// gradstats._C that loads them, reports how it was built and does the per-tensor bookkeeping that
// costs ~100 ns a tensor in Python. Kernels live in cpu/ and cuda/.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
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

// The tensor behind a Python object, or a TypeError naming the item.
const at::Tensor& unpack(py::handle item, size_t index, const char* what) {
  if (!THPVariable_Check(item.ptr())) {
    throw py::type_error(std::string(what) + ": item " + std::to_string(index) + " is a " +
                         Py_TYPE(item.ptr())->tp_name + ", expected a tensor or a parameter");
  }
  return THPVariable_Unpack(item.ptr());
}

py::object wrap(const at::Tensor& t) {
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(t));
}

// The defined .grad of each parameter, in order (what torch.nn.utils collects in Python). Works on
// the Python objects directly: no intermediate vector of tensors, no conversions back.
py::list collect_grads(const py::list& params) {
  py::list grads;
  size_t index = 0;
  for (const py::handle item : params) {
    const at::Tensor& g = unpack(item, index++, "collect_grads").grad();
    if (g.defined()) grads.append(wrap(g));
  }
  return grads;
}

// What grad_stats reads of each item: a Parameter, or a leaf tensor that requires grad, gives its
// .grad (nothing when it has none); any other tensor gives itself. The Parameter test is on the
// exact type hierarchy (PyObject_TypeCheck), as the metaclass's isinstance would cost a Python
// call.
py::list grads_or_tensors(const py::list& items, const py::handle& parameter_type) {
  py::list out;
  auto* parameter = reinterpret_cast<PyTypeObject*>(parameter_type.ptr());
  size_t index = 0;
  for (const py::handle item : items) {
    const at::Tensor& t = unpack(item, index++, "grad_stats");
    if (!PyObject_TypeCheck(item.ptr(), parameter) && !(t.requires_grad() && t.is_leaf())) {
      out.append(item);
    } else if (t.grad().defined()) {
      out.append(wrap(t.grad()));
    }
  }
  return out;
}

// Indices of the tensors on each device, devices in order of first appearance.
std::vector<std::vector<int64_t>> device_groups(const py::list& tensors) {
  std::vector<c10::Device> devices;
  std::vector<std::vector<int64_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const c10::Device d = unpack(tensors[i], i, "device_groups").device();
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
  m.def("grads_or_tensors", &grads_or_tensors, "what grad_stats reads of each item");
}
