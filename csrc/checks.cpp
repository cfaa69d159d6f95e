#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace gradstats {

const std::vector<std::pair<const char*, const char*>>& argument_messages() {
  static const std::vector<std::pair<const char*, const char*>> table = {
      {"norm_type",
       "norm_type must be a number: any p (0 counts nonzero elements; p < 0 as "
       "torch.linalg.vector_norm), inf or -inf, but not NaN"},
      {"max_norm", "max_norm must be a non-negative number (or inf)"},
      {"on_nonfinite", "the op's on_nonfinite must be 'propagate', 'skip' or 'zero'"},
      {"dtype", "expected float64, float32, float16 or bfloat16"},
      {"complex",
       "complex64/complex128 are read as their moduli, as torch.linalg.vector_norm reads them"},
  };
  return table;
}

namespace {

const char* message(const char* key) {
  for (const auto& [k, text] : argument_messages()) {
    if (std::string(k) == key) return text;
  }
  TORCH_INTERNAL_ASSERT(false, "no message for ", key);
}

}  // namespace

bool supported_dtype(at::ScalarType type) {
  return type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

int64_t element_reach(c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  int64_t reach = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) return 0;
    reach += (sizes[d] - 1) * strides[d];
  }
  return reach;
}

bool within_storage(int64_t storage_offset, int64_t reach, int64_t itemsize, size_t storage_bytes) {
  return reach == 0 || static_cast<size_t>((storage_offset + reach) * itemsize) <= storage_bytes;
}

bool is_walkable(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return true;
  Layout layout;
  return make_layout(t.sizes().data(), t.strides().data(), static_cast<int>(t.dim()), layout);
}

std::vector<at::Tensor> prepare_tensors(at::TensorList tensors, const char* op, bool write) {
  TORCH_CHECK(!tensors.empty(), "gradstats.", op,
              ": got an empty list of tensors; expected at least one (the Python API returns "
              "early for empty lists)");
  const c10::Device device = tensors[0].device();
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "gradstats.", op, ": tensor ", i, " is undefined (None)");
    TORCH_CHECK(t.layout() == c10::kStrided, "gradstats.", op, ": tensor ", i, " has layout ",
                t.layout(),
                "; expected dense (strided) tensors. Sparse gradients are not "
                "supported: pass .to_dense() or the values of the sparse tensor");
    TORCH_CHECK(t.device() == device, "gradstats.", op, ": tensor ", i, " is on ", t.device(),
                " but tensor 0 is on ", device,
                "; the op takes the tensors of one device (the Python API groups them by device)");
    TORCH_CHECK(
        t.has_storage() && within_storage(t.storage_offset(), element_reach(t.sizes(), t.strides()),
                                          t.element_size(), t.storage().nbytes()),
        "gradstats.", op, ": tensor ", i, " (sizes ", t.sizes(), ", strides ", t.strides(),
        ", storage offset ", t.storage_offset(), ") reaches past the end of its storage (",
        t.has_storage() ? t.storage().nbytes() : 0,
        " bytes); was the storage resized in place since the tensor was made?");
    // Complex tensors: the statistics are those of the moduli (torch's norms of every order, one
    // count per complex element), scaling goes through the real view (a real factor scales both
    // parts; the conjugate bit changes nothing, so the memory is scaled as it is).
    at::Tensor real = t;
    if (t.is_complex()) real = write ? at::view_as_real(t.is_conj() ? t.conj() : t) : at::abs(t);
    const auto type = real.scalar_type();
    TORCH_CHECK(supported_dtype(type), "gradstats.", op, ": tensor ", i, " has dtype ",
                t.scalar_type(), "; ", message("dtype"), " (", message("complex"), ")");
    if (write) {
      TORCH_CHECK(at::has_internal_overlap(real) != at::MemOverlap::Yes, "gradstats.", op,
                  ": tensor ", i, " (sizes ", real.sizes(), ", strides ", real.strides(),
                  ") has elements that share memory (an expanded or broadcast view); scaling it in "
                  "place would scale those elements more than once. Pass a tensor that owns its "
                  "memory (.clone())");
    }
    // A view with more dimensions that cannot be merged than the kernels' walks hold is read
    // through a contiguous copy; scale_ writes it in place with ATen ops (scale_unwalkable).
    if (!write && !is_walkable(real)) real = real.contiguous();
    out.push_back(std::move(real));
  }
  return out;
}

std::vector<int64_t> unwalkable(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!is_walkable(tensors[i])) out.push_back(static_cast<int64_t>(i));
  }
  return out;
}

void scale_unwalkable(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& which,
                      const at::Tensor& coef, const std::optional<at::Tensor>& zero_nonfinite) {
  if (which.empty()) return;
  // As the kernels: scaled only when coef < 1 (or NaN, which propagates); by 1 otherwise, which
  // leaves every value as it was. Decided on the device, without a sync.
  const at::Tensor clips = coef.lt(1).logical_or(coef.isnan());
  const at::Tensor factor = at::where(clips, coef, at::ones_like(coef));
  for (const int64_t i : which) {
    const at::Tensor& t = tensors[i];
    if (zero_nonfinite.has_value()) {
      const at::Tensor holds = zero_nonfinite->select(0, i).gt(0);
      t.masked_fill_(t.isfinite().logical_not().logical_and(holds), 0);
    }
    t.mul_(factor.reshape({}));
  }
}

Layout tensor_layout(const at::Tensor& t, int64_t index, const char* op) {
  Layout layout;
  TORCH_CHECK(make_layout(t.sizes().data(), t.strides().data(), static_cast<int>(t.dim()), layout),
              "gradstats.", op, ": tensor ", index, " has more than ", kMaxLayoutDims,
              " dimensions that cannot be merged (sizes ", t.sizes(), ", strides ", t.strides(),
              "); pass a contiguous tensor");
  return layout;
}

NormSpec parse_norm_type(double norm_type) {
  TORCH_CHECK(!std::isnan(norm_type), "gradstats: ", message("norm_type"), "; got ", norm_type);
  return make_norm_spec(norm_type);
}

double parse_max_norm(double max_norm) {
  TORCH_CHECK(max_norm >= 0.0, "gradstats: ", message("max_norm"), "; got ", max_norm);
  return max_norm;
}

Nonfinite parse_nonfinite(c10::string_view name) {
  if (name == "propagate") return Nonfinite::kPropagate;
  if (name == "skip") return Nonfinite::kSkip;
  if (name == "zero") return Nonfinite::kZero;
  TORCH_CHECK(false, "gradstats: ", message("on_nonfinite"), "; got '", std::string(name), "'");
}

DType dtype_tag(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return DType::kFloat64;
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "gradstats: unsupported dtype ", type);
  }
}

at::ScalarType norm_dtype(const std::vector<at::Tensor>& tensors, bool wide) {
  if (wide) return at::kDouble;
  for (const auto& t : tensors) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

StatsOutputs allocate_stats_outputs(c10::Device device, int64_t n, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return StatsOutputs{at::empty({}, opts), at::empty({}, opts), at::empty({n}, opts),
                      at::empty({kCountRows, n + 1}, opts.dtype(at::kLong))};
}

std::optional<at::Tensor> check_scale_args(c10::Device device, int64_t n, const at::Tensor& coef,
                                           const std::optional<at::Tensor>& zero_nonfinite) {
  TORCH_CHECK(coef.numel() == 1 && coef.is_floating_point(),
              "gradstats.scale_: coef must hold one floating-point value; got a tensor of dtype ",
              coef.scalar_type(), " and sizes ", coef.sizes());
  TORCH_CHECK(coef.device() == device, "gradstats.scale_: coef is on ", coef.device(),
              " but the tensors are on ", device, "; move it with .to(", device, ")");
  if (!zero_nonfinite.has_value()) return std::nullopt;
  const at::Tensor& counts = *zero_nonfinite;
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == n,
              "gradstats.scale_: zero_nonfinite must be the per-tensor non-finite counts, int64 of "
              "shape [",
              n, "]; got dtype ", counts.scalar_type(), " and sizes ", counts.sizes());
  TORCH_CHECK(counts.device() == device, "gradstats.scale_: zero_nonfinite is on ", counts.device(),
              " but the tensors are on ", device);
  return counts;
}

FeatureInput prepare_feature_input(const at::Tensor& input, int64_t dim) {
  TORCH_CHECK(input.defined(), "gradstats.feature_stats: the input is undefined (None)");
  TORCH_CHECK(input.layout() == c10::kStrided, "gradstats.feature_stats: the input has layout ",
              input.layout(),
              "; expected a dense (strided) tensor (pass the values of a sparse one)");
  const auto type = input.scalar_type();
  TORCH_CHECK(supported_dtype(type), "gradstats.feature_stats: the input has dtype ", type, "; ",
              message("dtype"));
  const int64_t ndim = input.dim();
  TORCH_CHECK(ndim >= 1,
              "gradstats.feature_stats: the input is 0-dim; expected at least one "
              "dimension, one of which holds the features");
  TORCH_CHECK(dim >= -ndim && dim < ndim, "gradstats.feature_stats: dim ", dim,
              " is out of range for an input of ", ndim, " dimensions (sizes ", input.sizes(), ")");
  const int64_t d = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK(input.size(d) > 0, "gradstats.feature_stats: the feature dimension ", d,
              " of the input (sizes ", input.sizes(), ") is empty");
  FeatureShape shape{1, input.size(d), 1};
  for (int64_t i = 0; i < d; ++i) shape.outer *= input.size(i);
  for (int64_t i = d + 1; i < ndim; ++i) shape.inner *= input.size(i);
  return FeatureInput{input.contiguous(), shape};
}

namespace {

// Sparse tensors dispatch to their own keys, where no kernel would otherwise exist: these kernels
// run the common checks, which reject them with a message that says what to pass instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reject_sparse_stats(
    at::TensorList tensors, double, double, c10::string_view, bool) {
  prepare_tensors(tensors, "stats", /*write=*/false);
  TORCH_CHECK(false, "gradstats.stats: unsupported tensor layout");
}

void reject_sparse_scale(at::TensorList tensors, const at::Tensor&,
                         const std::optional<at::Tensor>&) {
  prepare_tensors(tensors, "scale_", /*write=*/true);
  TORCH_CHECK(false, "gradstats.scale_: unsupported tensor layout");
}

at::Tensor reject_sparse_features(const at::Tensor& input, int64_t dim) {
  prepare_feature_input(input, dim);
  TORCH_CHECK(false, "gradstats.feature_stats: unsupported tensor layout");
}

void register_sparse_rejections(torch::Library& m) {
  m.impl("stats", &reject_sparse_stats);
  m.impl("scale_", &reject_sparse_scale);
  m.impl("feature_stats", &reject_sparse_features);
}

}  // namespace

// The conjugate and negative bits change no modulus, no count and nothing a real factor does: the
// kernels read and scale the memory as it is (checks.cpp prepare_tensors), so these ops skip the
// dispatcher's fallbacks, which copy the inputs and refuse mutable lists such as scale_'s.
// (feature_stats is not among them: a negative bit changes sums and extremes.)
TORCH_LIBRARY_IMPL(gradstats, Conjugate, m) {
  m.impl("stats", torch::CppFunction::makeFallthrough());
  m.impl("scale_", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(gradstats, Negative, m) {
  m.impl("stats", torch::CppFunction::makeFallthrough());
  m.impl("scale_", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(gradstats, SparseCPU, m) { register_sparse_rejections(m); }
TORCH_LIBRARY_IMPL(gradstats, SparseCUDA, m) { register_sparse_rejections(m); }
TORCH_LIBRARY_IMPL(gradstats, SparseCsrCPU, m) { register_sparse_rejections(m); }
TORCH_LIBRARY_IMPL(gradstats, SparseCsrCUDA, m) { register_sparse_rejections(m); }

}  // namespace gradstats
