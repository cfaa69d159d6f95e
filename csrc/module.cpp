// The pybind11 module gradstats._C. Importing it loads the library, which registers the ops
// (ops.cpp) and their kernels; the functions here do the per-tensor bookkeeping that costs
// ~100 ns a tensor in Python. How the library was built is recorded once, in _build_info.json.
#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "device_plan.h"

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

// Whether a coefficient on the CPU is >= 1 (nothing to clip): the host reads it for free, as no
// device has to be waited for. None for a coefficient elsewhere, which only its device may read
// without a synchronisation. Native, as a Python read costs more than the check saves.
std::optional<bool> cpu_coef_at_least_one(const at::Tensor& coef) {
  if (!coef.device().is_cpu() || coef.numel() != 1) return std::nullopt;
  return coef.item<double>() >= 1.0;
}

// What a parameter's gradient was when a GradPlan was built: a plan stays valid while each
// gradient is the same tensor, on the same memory (storage and offset), with the same element count
// and dtype (reassigning .data, resize_ or set_ change one of those; a transpose in place keeps the
// set of elements, which is all that norms and a scale depend on). The signature holds weak
// references: they keep the two addresses from being reused by another tensor or storage (so that
// equal addresses mean the same objects) without keeping the gradient's memory alive.
struct GradSignature {
  const c10::TensorImpl* impl = nullptr;  // null: no gradient
  const c10::StorageImpl* storage = nullptr;
  int64_t offset = 0;
  int64_t numel = 0;
  caffe2::TypeMeta dtype;
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl_ref{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  c10::weak_intrusive_ptr<c10::StorageImpl> storage_ref{c10::intrusive_ptr<c10::StorageImpl>()};

  explicit GradSignature(const at::Tensor& g) {
    if (!g.defined()) return;
    impl = g.unsafeGetTensorImpl();
    storage = g.storage().unsafeGetStorageImpl();
    offset = g.storage_offset();
    numel = g.numel();
    dtype = g.dtype();
    impl_ref =
        c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(g.getIntrusivePtr());
    storage_ref = g.storage().getWeakStorageImpl();
  }

  bool matches(const c10::TensorImpl* g) const {
    if (g != impl) return false;
    if (g == nullptr) return true;
    return g->unsafe_storage().unsafeGetStorageImpl() == storage && g->storage_offset() == offset &&
           g->numel() == numel && g->dtype() == dtype;
  }
};

// Where a parameter's gradient lives: its autograd metadata, which lasts as long as the parameter
// does (null until the tensor first requires grad). Reading .grad from it directly skips
// Tensor::grad()'s non-leaf warning check and a call.
const torch::autograd::AutogradMeta* grad_owner(const at::Tensor& param) {
  return static_cast<const torch::autograd::AutogradMeta*>(
      param.unsafeGetTensorImpl()->autograd_meta());
}

const c10::TensorImpl* grad_of(const torch::autograd::AutogradMeta* owner) {
  if (owner == nullptr) return nullptr;
  const at::Tensor& g = owner->grad_;
  return g.defined() ? g.unsafeGetTensorImpl() : nullptr;
}

// Whether the kernels can keep a gradient in a plan across steps: a dense tensor of a supported
// dtype, owning its memory, not a subclass (a DTensor is reduced over its mesh by
// gradstats.distributed) and walkable in place (a cached contiguous copy would go stale).
bool plannable(const at::Tensor& g, c10::Device device) {
  const at::ScalarType type =
      g.is_complex() ? c10::toRealValueType(g.scalar_type()) : g.scalar_type();
  return gradstats::supported_dtype(type) && g.layout() == c10::kStrided && g.device() == device &&
         !g.key_set().has(c10::DispatchKey::Python) && gradstats::is_walkable(g) &&
         at::has_internal_overlap(g) != at::MemOverlap::Yes;
}

// The native half of gradstats.GradPlan: a fixed list of parameters whose gradients are
// validated, grouped and planned once (make_device_plan) and re-planned only when one changes
// (a new or removed gradient, reallocated by zero_grad(set_to_none=True), a new shape or dtype).
// Checking costs a few pointer compares per parameter; a step then runs the kernels on the plan:
// no per-tensor checks, planning or dispatcher conversions.
class GradPlan {
 public:
  explicit GradPlan(py::list params) : params_(std::move(params)) {
    size_t index = 0;
    for (const py::handle item : params_) {
      const at::Tensor& param = unpack(item, index++, "GradPlan");
      tensors_.push_back(param.unsafeGetTensorImpl());
      owners_.push_back(grad_owner(param));
    }
  }

  // The parameters that have a gradient, in order.
  py::list params_with_grads() {
    refresh();
    return with_grads_;
  }

  // Whether the norms of the planned gradients are float64 (checks.h norm_dtype); None when the
  // gradients are not planned (not all on one device, or one not plannable): the Python side
  // then takes the functional path, as for stats and scale.
  std::optional<bool> wide_norms() {
    refresh();
    if (!plan_) return std::nullopt;
    return plan_->narrow_dtype() == at::kDouble;
  }

  // How many times the plan was built: once, and again after each change of a gradient.
  int64_t builds() const { return builds_; }

  // The stats op on the gradients (None when not planned); with clip, the scale op follows with
  // the coefficient it computed, zeroing NaN/Inf under "zero".
  py::object stats(double norm_type, double max_norm, c10::string_view on_nonfinite, bool wide,
                   bool clip) {
    refresh();
    if (!plan_) return py::none();
    const gradstats::NormSpec spec = gradstats::parse_norm_type(norm_type);
    gradstats::parse_max_norm(max_norm);
    const gradstats::Nonfinite policy = gradstats::parse_nonfinite(on_nonfinite);
    const gradstats::StatsOutputs out = plan_->stats(spec, policy, max_norm, wide);
    if (clip) {
      std::optional<at::Tensor> zero;
      if (policy == gradstats::Nonfinite::kZero) {
        zero = out.counts.select(0, gradstats::kNonfiniteRow).narrow(0, 0, plan_->count());
      }
      plan_->scale(out.clip_coef, zero);
    }
    return py::make_tuple(out.total_norm, out.clip_coef, out.norms, out.counts);
  }

  // The scale op on the planned gradients; false (nothing done) when they are not planned.
  bool scale(const at::Tensor& coef, const std::optional<at::Tensor>& zero_nonfinite) {
    // Nothing to zero and a CPU coefficient >= 1: no gradient changes, none need be looked at.
    if (!zero_nonfinite && cpu_coef_at_least_one(coef).value_or(false)) return true;
    refresh();
    if (!plan_) return false;
    plan_->scale(
        coef, gradstats::check_scale_args(plan_->device(), plan_->count(), coef, zero_nonfinite));
    return true;
  }

 private:
  void refresh() {
    if (built_ && fresh()) return;
    signatures_.clear();
    with_grads_ = py::list();
    std::vector<at::Tensor> grads;
    bool ok = true;
    size_t index = 0;
    for (const py::handle item : params_) {
      const at::Tensor& param = THPVariable_Unpack(item.ptr());
      owners_[index++] = grad_owner(param);  // made when the tensor first required grad
      const at::Tensor& g = param.grad();
      signatures_.emplace_back(g);
      if (!g.defined()) continue;
      ok = ok && plannable(g, grads.empty() ? g.device() : grads[0].device());
      with_grads_.append(item);
      grads.push_back(g);
    }
    plan_.reset();
    if (ok && !grads.empty()) {
      std::vector<at::Tensor> prepared = gradstats::prepare_tensors(grads, "GradPlan", true);
      plan_ = gradstats::make_device_plan(std::move(prepared));
      plan_->release_tensors();  // the signatures and the parameters stand for them
    }
    built_ = true;
    ++builds_;
  }

  bool fresh() const {
    const size_t n = owners_.size();
    for (size_t i = 0; i < n; ++i) {
      // Each check follows pointers (metadata, gradient, its storage) that a training step's
      // forward and backward have evicted from the caches: fetch them a few parameters ahead.
      if (i + kPrefetchAhead < n) prefetch_grad(owners_[i + kPrefetchAhead]);
      if (i + 2 * kPrefetchAhead < n) __builtin_prefetch(owners_[i + 2 * kPrefetchAhead]);
      // A tensor without autograd metadata at the last build may have been given some since.
      const torch::autograd::AutogradMeta* owner =
          owners_[i] != nullptr
              ? owners_[i]
              : static_cast<const torch::autograd::AutogradMeta*>(tensors_[i]->autograd_meta());
      if (!signatures_[i].matches(grad_of(owner))) return false;
    }
    return true;
  }

  // How many parameters ahead fresh() fetches: enough loads in flight to cover a cache miss.
  static constexpr size_t kPrefetchAhead = 8;

  static void prefetch_grad(const torch::autograd::AutogradMeta* owner) {
    const c10::TensorImpl* g = grad_of(owner);
    if (g == nullptr) return;
    // The storage pointer opens the TensorImpl; the offset, numel and dtype sit further on.
    const char* base = reinterpret_cast<const char*>(g);
    for (size_t at = 0; at < sizeof(c10::TensorImpl); at += kCacheLine) {
      __builtin_prefetch(base + at);
    }
  }

  static constexpr size_t kCacheLine = 64;

  py::list params_;  // keeps the parameters, and so the pointers below, alive
  std::vector<const c10::TensorImpl*> tensors_;
  std::vector<const torch::autograd::AutogradMeta*> owners_;
  py::list with_grads_;
  std::vector<GradSignature> signatures_;
  std::unique_ptr<gradstats::DevicePlan> plan_;
  bool built_ = false;
  int64_t builds_ = 0;
};

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
  py::class_<GradPlan>(m, "GradPlan",
                       "the native half of gradstats.GradPlan: gradients planned once, re-planned "
                       "when one changes")
      .def(py::init<py::list>())
      .def("params_with_grads", &GradPlan::params_with_grads)
      .def("wide_norms", &GradPlan::wide_norms)
      .def("builds", &GradPlan::builds)
      .def("stats", &GradPlan::stats)
      .def("scale", &GradPlan::scale);
  m.def("cpu_coef_at_least_one", &cpu_coef_at_least_one,
        "whether a CPU coefficient is >= 1; None on other devices");
}
