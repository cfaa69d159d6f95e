// The native half of gradstats.GradPlan (bound in module.cpp): a fixed list of parameters whose
// gradients are validated, grouped and planned once (make_device_plan) and re-planned only when
// what the kernels read of one changes.
//
// What a plan caches is each gradient's layout: whether there is one, its dtype, device, dispatch
// keys, sizes and strides. Where the elements are is never cached: at every call each parameter's
// current gradient is read from the parameter's Python object (not from a TensorImpl kept from an
// earlier call: torch.utils.swap_tensors exchanges those), its layout compared with the plan's,
// its storage checked to hold it, and its address handed to the plan (DevicePlan::rebind). So a
// gradient that is a new tensor with the same layout (zero_grad(set_to_none=True), torch's
// default) keeps the plan, and no mutation torch allows (resize_ of the storage or of the tensor,
// set_, as_strided_, .data =, swap_tensors, a new dtype or device, None) can make the kernels read
// or write memory that was not verified in the same call. The plan holds the parameters (the Python
// list) and no pointer into anything else between calls.
//
// DTensor gradients (FSDP2, tensor parallel) are planned through their local tensors, read at each
// call from the DTensor's own attributes (no autograd dispatch, unlike to_local()); their sharding
// (the DTensor's spec) is part of the layout. gradstats.GradPlan reduces the local statistics over
// the meshes (gradstats.distributed).
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "checks.h"
#include "device_plan.h"

namespace gradstats {

// Whether a coefficient on the CPU is >= 1 (nothing to clip): the host reads it for free, as no
// device has to be waited for. None for a coefficient elsewhere, which only its device may read
// without a synchronisation. Native, as a Python read costs more than the check saves.
inline std::optional<bool> cpu_coef_at_least_one(const at::Tensor& coef) {
  if (!coef.device().is_cpu() || coef.numel() != 1) return std::nullopt;
  return coef.item<double>() >= 1.0;
}

// Whether a tensor is a plain dense one, whose sizes, strides and storage may be asked for: not a
// sparse or other non-strided layout, not a subclass (a DTensor is reduced over its mesh by
// gradstats.distributed), not a tensor with symbolic sizes.
inline bool dense_tensor(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.layout() == c10::kStrided && !t.key_set().has(c10::DispatchKey::Python) &&
         !impl->has_symbolic_sizes_strides() && impl->has_storage();
}

// An attribute name as a Python string made once and never freed: a static pybind11::str would be
// released after the interpreter has gone, at exit.
inline pybind11::handle interned(const char* name) {
  return pybind11::handle(PyUnicode_InternFromString(name));
}

// What the kernels read of a gradient, but for where its elements are.
class GradLayout {
 public:
  GradLayout() = default;  // no gradient

  // The layout of g (grad: its Python object), or for a gradient the plan cannot keep (neither a
  // dense_tensor nor a DTensor of one) one that no gradient matches: such a list is planned anew at
  // each call (and takes the functional path).
  GradLayout(const at::Tensor& g, PyObject* grad) {
    if (dense_tensor(g)) {
      describe(*g.unsafeGetTensorImpl(), kDense);
      return;
    }
    const std::optional<DTensorParts> parts = dtensor_parts(grad);
    if (!parts || !dense_tensor(THPVariable_Unpack(parts->local.ptr()))) {
      kind_ = kOther;
      return;
    }
    describe(*THPVariable_Unpack(parts->local.ptr()).unsafeGetTensorImpl(), kDTensor);
    wrapper_keys_ = g.key_set();
    spec_ = parts->spec;
  }

  // A DTensor's parts as its own attributes hold them (what to_local() returns, without the
  // autograd Function around it); none for any other tensor.
  struct DTensorParts {
    pybind11::object spec;   // the DTensorSpec: mesh and placements
    pybind11::object local;  // the local tensor
  };
  static std::optional<DTensorParts> dtensor_parts(PyObject* grad) {
    static const pybind11::handle spec_name = interned("_spec");
    static const pybind11::handle local_name = interned("_local_tensor");
    // One lookup each, an AttributeError meaning "not a DTensor" (cheaper than hasattr, then attr).
    auto attribute = [grad](pybind11::handle name) {
      PyObject* value = PyObject_GetAttr(grad, name.ptr());
      if (value == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw pybind11::error_already_set();
        PyErr_Clear();
      }
      return pybind11::reinterpret_steal<pybind11::object>(value);
    };
    pybind11::object local = attribute(local_name);
    if (!local || !THPVariable_Check(local.ptr())) return std::nullopt;
    pybind11::object spec = attribute(spec_name);
    if (!spec) return std::nullopt;
    return DTensorParts{std::move(spec), std::move(local)};
  }

  bool is_dtensor() const { return kind_ == kDTensor; }

  // For a DTensor layout: the local tensor of g (the gradient of `param`), when g is a DTensor of
  // the planned spec whose local tensor matches() the planned layout; null otherwise. The spec is
  // compared by identity first (FSDP2 gives each step's gradient its parameter's spec object),
  // else by value.
  const c10::TensorImpl* local_tensor(PyObject* param, const c10::TensorImpl* g) const {
    if (g == nullptr || g->key_set() != wrapper_keys_) return nullptr;
    static const pybind11::handle grad_name = interned("grad");
    const pybind11::object grad = pybind11::handle(param).attr(grad_name);
    const std::optional<DTensorParts> parts = dtensor_parts(grad.ptr());
    if (!parts || !(parts->spec.is(spec_) || parts->spec.equal(spec_))) return nullptr;
    const c10::TensorImpl* local = THPVariable_Unpack(parts->local.ptr()).unsafeGetTensorImpl();
    // The DTensor (held by the parameter) keeps its local tensor alive through the call.
    return matches(local, kDTensor) ? local : nullptr;
  }

  // Fetches the storage of g ahead of matches(g), when g is a dense tensor as planned (only those
  // may be asked for their storage).
  void prefetch_storage(const c10::TensorImpl* g) const {
    if (g != nullptr && kind_ == kDense && g->key_set() == keys_ && g->unsafe_storage()) {
      __builtin_prefetch(g->unsafe_storage().unsafeGetStorageImpl());
    }
  }

  // Whether g (null: no gradient) has this layout, and its storage holds it at its offset.
  bool matches(const c10::TensorImpl* g) const { return matches(g, kDense); }

  // Where the elements of g, which matches(), start. mutable_data: the plan may write (scale), so
  // a copy-on-write storage is materialised now, as any in-place torch op would.
  uint64_t address(const c10::TensorImpl* g) const {
    char* data = static_cast<char*>(g->unsafe_storage().mutable_data());
    return reinterpret_cast<uint64_t>(data + g->storage_offset() * itemsize_);
  }

 private:
  enum Kind { kNone, kDense, kDTensor, kOther };

  void describe(const c10::TensorImpl& impl, Kind kind) {
    kind_ = kind;
    keys_ = impl.key_set();
    dtype_ = impl.dtype();
    device_ = impl.device();
    dim_ = impl.dim();
    sizes_strides_.append(impl.sizes().begin(), impl.sizes().end());
    sizes_strides_.append(impl.strides().begin(), impl.strides().end());
    reach_ = element_reach(impl.sizes(), impl.strides());
    itemsize_ = static_cast<int64_t>(impl.itemsize());
  }

  // Whether g is a tensor of this layout, of kind `as` (a gradient, or a DTensor's local tensor).
  bool matches(const c10::TensorImpl* g, Kind as) const {
    if (g == nullptr || kind_ != as) return g == nullptr && kind_ == kNone;
    // The dispatch keys first: equal to a plain dense tensor's, they rule out a subclass, a sparse
    // or a lazy tensor, whose sizes or storage must not be asked for.
    if (g->key_set() != keys_ || g->dtype() != dtype_ || g->device() != device_ ||
        g->has_symbolic_sizes_strides() || g->dim() != dim_) {
      return false;
    }
    const int64_t* sizes = g->sizes().data();
    const int64_t* strides = g->strides().data();
    for (int64_t d = 0; d < dim_; ++d) {
      if (sizes[d] != sizes_strides_[d] || strides[d] != sizes_strides_[dim_ + d]) return false;
    }
    const c10::Storage& storage = g->unsafe_storage();
    return storage && within_storage(g->storage_offset(), reach_, itemsize_, storage.nbytes());
  }

  // Dimensions whose sizes and strides a layout holds in place (more go to the heap): a plan's
  // layouts lie in one array, read in order at every call, without a pointer to follow.
  static constexpr size_t kInlineDims = 5;

  Kind kind_ = kNone;
  c10::DispatchKeySet wrapper_keys_;  // a DTensor gradient's own keys
  pybind11::object spec_;             // a DTensor gradient's spec
  c10::DispatchKeySet keys_;
  caffe2::TypeMeta dtype_;
  c10::Device device_{c10::kCPU};
  int64_t dim_ = 0;
  c10::SmallVector<int64_t, 2 * kInlineDims> sizes_strides_;  // the sizes, then the strides
  int64_t reach_ = 0;  // element_reach of the sizes and strides
  int64_t itemsize_ = 0;
};

// The gradient of a parameter now: read through the parameter's Python object (which
// swap_tensors may have pointed at another TensorImpl) and its autograd metadata. Null when it
// has none. Skips Tensor::grad()'s non-leaf warning check and a call.
inline const c10::TensorImpl* current_grad(PyObject* param) {
  const c10::TensorImpl* impl = THPVariable_Unpack(param).unsafeGetTensorImpl();
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
  if (meta == nullptr || !meta->grad_.defined()) return nullptr;
  return meta->grad_.unsafeGetTensorImpl();
}

// Whether the kernels can keep a gradient in a plan across steps: a dense_tensor of a supported
// real dtype (a complex one is read through its moduli, computed anew each call: checks.h), on the
// plan's device, walkable in place (a cached contiguous copy would go stale) and not writing any
// element twice.
inline bool plannable(const at::Tensor& g, c10::Device device) {
  return dense_tensor(g) && supported_dtype(g.scalar_type()) && g.device() == device &&
         is_walkable(g) && at::has_internal_overlap(g) != at::MemOverlap::Yes;
}

class GradPlan {
 public:
  explicit GradPlan(const pybind11::list& params);

  // The parameters that have a gradient, in order.
  pybind11::list params_with_grads() {
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

  // How many times the plan was built: once, and again after each change of a gradient's layout.
  int64_t builds() const { return builds_; }

  // Whether `groups` (sequences of parameters, e.g. an optimizer's param_groups' "params") hold
  // exactly this plan's parameters, in order: the very objects, not equal tensors.
  bool same_params(const pybind11::list& groups) const;

  // The stats op on the gradients (None when not planned): (total, coef, norms, counts, local)
  // with local None; with clip, the scale op follows with the coefficient it computed, zeroing
  // NaN/Inf under "zero". A plan of DTensor gradients instead returns this rank's statistics of
  // their local tensors (float64, no coefficient, nothing clipped), for the caller to combine over
  // the meshes, with local telling whether the local norms are float64 (else float32).
  pybind11::object stats(double norm_type, double max_norm, c10::string_view on_nonfinite,
                         bool wide, bool clip);

  // The scale op on the planned gradients; false (nothing done) when they are not planned.
  bool scale(const at::Tensor& coef, const std::optional<at::Tensor>& zero_nonfinite);

 private:
  // Makes the plan serve the gradients as they are now: verified and rebound, or planned anew.
  void refresh();
  // Compares each current gradient with its planned layout, collecting their addresses;
  // false at the first that differs.
  bool verify();
  void rebuild();

  // verify()'s pointer chase, one link per pass over the parameters: the parameters' TensorImpls,
  // then their autograd metadata, then their gradients (reused from call to call).
  std::vector<const c10::TensorImpl*> chase_;

  // How many gradients ahead verify() fetches: enough loads in flight to cover a cache miss.
  static constexpr size_t kPrefetchAhead = 8;
  static constexpr size_t kCacheLine = 64;

  // Fetches every cache line of a TensorImpl (the fields the checks read spread over several).
  static void prefetch_object(const c10::TensorImpl* impl) {
    if (impl == nullptr) return;
    const char* base = reinterpret_cast<const char*>(impl);
    for (size_t at = 0; at < sizeof(c10::TensorImpl); at += kCacheLine) {
      __builtin_prefetch(base + at);
    }
  }

  pybind11::list params_;  // the parameters, kept alive: the only objects the plan refers to
  std::vector<GradLayout> layouts_;
  std::vector<uint64_t> addresses_;  // of the gradients, in this call only
  pybind11::list with_grads_;
  bool sharded_ = false;  // some gradient is a DTensor: statistics are local, combined in Python
  std::unique_ptr<DevicePlan> plan_;
  // The max_norm of a plan's local statistics: their coefficient is computed after combining.
  static constexpr double kNoClip = std::numeric_limits<double>::infinity();
  int64_t builds_ = 0;
};

// ------------------------------------------------------------------------------ definitions
// (here rather than in a .cpp of their own: module.cpp is their one user, and a translation unit
// of torch's headers costs most of a minute to compile)

inline GradPlan::GradPlan(const pybind11::list& params) : params_(params) {
  size_t index = 0;
  for (const pybind11::handle item : params_) {
    TORCH_CHECK_TYPE(THPVariable_Check(item.ptr()), "GradPlan: item ", index, " is a ",
                     Py_TYPE(item.ptr())->tp_name, ", expected a tensor or a parameter");
    ++index;
  }
  layouts_.resize(params_.size());
}

inline bool GradPlan::same_params(const pybind11::list& groups) const {
  size_t at = 0;
  const size_t n = params_.size();
  for (const pybind11::handle group : groups) {
    const pybind11::sequence items = pybind11::reinterpret_borrow<pybind11::sequence>(group);
    const size_t size = items.size();
    if (size > n - at) return false;
    for (size_t i = 0; i < size; ++i, ++at) {
      if (items[i].ptr() != PyList_GET_ITEM(params_.ptr(), static_cast<Py_ssize_t>(at))) {
        return false;
      }
    }
  }
  return at == n;
}

inline bool GradPlan::verify() {
  // Each check follows a chain of pointers (the parameter's Python object, its TensorImpl, its
  // autograd metadata, the gradient's TensorImpl, its storage) through objects scattered in
  // memory, which a training step's forward and backward have evicted from the caches. Followed
  // one link at a time over all the parameters, the loads of each pass are independent of one
  // another, so the processor keeps many of them in flight; a chain at a time would wait for
  // every miss in turn.
  PyObject* list = params_.ptr();
  const auto n = static_cast<size_t>(PyList_GET_SIZE(list));
  std::vector<const c10::TensorImpl*>& grads = chase_;
  grads.resize(n);
  const auto item = [list](size_t i) { return PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i)); };
  for (size_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) __builtin_prefetch(item(i + kPrefetchAhead));
    grads[i] = THPVariable_Unpack(item(i)).unsafeGetTensorImpl();
  }
  for (size_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) prefetch_object(grads[i + kPrefetchAhead]);
    grads[i] = reinterpret_cast<const c10::TensorImpl*>(grads[i]->autograd_meta());
  }
  for (size_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n && grads[i + kPrefetchAhead] != nullptr) {
      const auto* ahead =
          reinterpret_cast<const torch::autograd::AutogradMeta*>(grads[i + kPrefetchAhead]);
      __builtin_prefetch(&ahead->grad_);
    }
    const auto* meta = reinterpret_cast<const torch::autograd::AutogradMeta*>(grads[i]);
    grads[i] =
        meta == nullptr || !meta->grad_.defined() ? nullptr : meta->grad_.unsafeGetTensorImpl();
  }
  addresses_.clear();
  for (size_t i = 0; i < n; ++i) {
    // The checks read several lines of each gradient's TensorImpl, and then its storage: fetched
    // ahead, the TensorImpl first, its storage once the TensorImpl is in.
    if (i + 2 * kPrefetchAhead < n) prefetch_object(grads[i + 2 * kPrefetchAhead]);
    if (i + kPrefetchAhead < n)
      layouts_[i + kPrefetchAhead].prefetch_storage(grads[i + kPrefetchAhead]);
    const GradLayout& layout = layouts_[i];
    const c10::TensorImpl* g = grads[i];
    if (layout.is_dtensor()) {
      g = layout.local_tensor(item(i), g);
      if (g == nullptr) return false;
    } else if (!layout.matches(g)) {
      return false;
    }
    if (g != nullptr) addresses_.push_back(layout.address(g));
  }
  return true;
}

inline void GradPlan::rebuild() {
  with_grads_ = pybind11::list();
  sharded_ = false;
  std::vector<at::Tensor> grads;
  bool ok = true;
  PyObject* list = params_.ptr();
  for (size_t i = 0; i < layouts_.size(); ++i) {
    PyObject* item = PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i));
    const at::Tensor& g = THPVariable_Unpack(item).grad();
    layouts_[i] = GradLayout();
    if (!g.defined()) continue;
    // The gradient's Python object, where a subclass (a DTensor) keeps its parts.
    const pybind11::object grad =
        dense_tensor(g) ? pybind11::object() : pybind11::handle(item).attr("grad");
    layouts_[i] = GradLayout(g, grad.ptr());
    sharded_ = sharded_ || layouts_[i].is_dtensor();
    // What the kernels read: the gradient, or a DTensor's local tensor.
    const at::Tensor read =
        layouts_[i].is_dtensor()
            ? THPVariable_Unpack(GradLayout::dtensor_parts(grad.ptr())->local.ptr())
            : g;
    ok = ok && plannable(read, grads.empty() ? read.device() : grads[0].device());
    with_grads_.append(item);
    grads.push_back(read);
  }
  plan_.reset();
  ++builds_;
  if (!ok || grads.empty()) return;
  std::vector<at::Tensor> prepared = prepare_tensors(grads, "GradPlan", /*write=*/true);
  plan_ = make_device_plan(std::move(prepared));
  // From here on the plan is pointed at the gradients of each call (rebind): holding these would
  // keep a step's gradients in memory after zero_grad(set_to_none=True).
  plan_->release_tensors();
}

inline void GradPlan::refresh() {
  if (builds_ > 0 && verify()) {
    if (plan_) plan_->rebind(addresses_);
    return;
  }
  rebuild();
  // The layouts were just taken from these very gradients: this collects their addresses.
  if (verify() && plan_) plan_->rebind(addresses_);
}

inline pybind11::object GradPlan::stats(double norm_type, double max_norm,
                                        c10::string_view on_nonfinite, bool wide, bool clip) {
  refresh();
  if (!plan_) return pybind11::none();
  const NormSpec spec = parse_norm_type(norm_type);
  parse_max_norm(max_norm);
  const Nonfinite policy = parse_nonfinite(on_nonfinite);
  if (sharded_) {
    const StatsOutputs out = plan_->stats(spec, policy, kNoClip, /*wide=*/true);
    const bool narrow_double = plan_->narrow_dtype() == at::kDouble;
    return pybind11::make_tuple(out.total_norm, out.clip_coef, out.norms, out.counts,
                                narrow_double);
  }
  const StatsOutputs out = plan_->stats(spec, policy, max_norm, wide);
  if (clip) {
    std::optional<at::Tensor> zero;
    if (policy == Nonfinite::kZero) {
      zero = out.counts.select(0, kNonfiniteRow).narrow(0, 0, plan_->count());
    }
    plan_->scale(out.clip_coef, zero);
  }
  return pybind11::make_tuple(out.total_norm, out.clip_coef, out.norms, out.counts,
                              pybind11::none());
}

inline bool GradPlan::scale(const at::Tensor& coef,
                            const std::optional<at::Tensor>& zero_nonfinite) {
  // Nothing to zero and a CPU coefficient >= 1: no gradient changes, none need be looked at.
  if (!zero_nonfinite && cpu_coef_at_least_one(coef).value_or(false)) return true;
  refresh();
  if (!plan_) return false;
  plan_->scale(coef, check_scale_args(plan_->device(), plan_->count(), coef, zero_nonfinite));
  return true;
}

}  // namespace gradstats
