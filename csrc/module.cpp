// The pybind11 module gradstats._C. Importing it loads the library, which registers the ops
// (ops.cpp) and their kernels; the functions here do the per-tensor bookkeeping that costs
// ~100 ns a tensor in Python. How the library was built is recorded once, in _build_info.json.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "grad_plan.h"

namespace py = pybind11;

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
  m.doc() = "gradstats native library: loads torch.ops.gradstats and the bookkeeping helpers";
  m.def("collect_grads", &collect_grads, "the defined .grad of each parameter");
  m.def("device_groups", &device_groups, "indices of the tensors on each device");
  m.def("grads_or_tensors", &grads_or_tensors, "what grad_stats reads of each item");
  m.def(
      "argument_messages",
      [] {
        py::dict out;
        for (const auto& [key, text] : gradstats::argument_messages()) out[key] = text;
        return out;
      },
      "the messages of the argument checks, by key (csrc/checks.cpp)");
  m.def(
      "constants",
      [] {
        py::dict out;
        out["nan_row"] = gradstats::kNanRow;
        out["inf_row"] = gradstats::kInfRow;
        out["nonfinite_row"] = gradstats::kNonfiniteRow;
        out["clip_eps"] = gradstats::kClipEps;
        py::list rows;
        for (const char* name : gradstats::kFeatureRowNames) rows.append(name);
        out["feature_rows"] = rows;
        out["feature_additive_rows"] = gradstats::kFeatAdditiveRows;
        return out;
      },
      "the ops' layout constants: the rows of the counts and of feature_stats, the clip epsilon");
  using gradstats::GradPlan;
  py::class_<GradPlan>(m, "GradPlan",
                       "the native half of gradstats.GradPlan: gradients planned once, re-planned "
                       "when the layout of one changes, read where they are at each call")
      .def(py::init<const py::list&>())
      .def("params_with_grads", &GradPlan::params_with_grads)
      .def("wide_norms", &GradPlan::wide_norms)
      .def("builds", &GradPlan::builds)
      .def("same_params", &GradPlan::same_params)
      .def("stats", &GradPlan::stats)
      .def("scale", &GradPlan::scale);
  m.def("cpu_coef_at_least_one", &gradstats::cpu_coef_at_least_one,
        "whether a CPU coefficient is >= 1; None on other devices");
}
