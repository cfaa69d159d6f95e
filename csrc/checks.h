// Argument checks and output allocation shared by the CPU and CUDA implementations of the ops
// declared in ops.cpp, so that both devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <utility>
#include <vector>

#include "feature_stats.h"
#include "layout.h"
#include "partial.h"

namespace gradstats {

// The messages of the argument checks, by key: the ops raise "gradstats: <text>; got <value>" for a
// scalar argument and name the dtypes they take, and the Python API and the fakes raise the same
// from this table (gradstats._C).
const std::vector<std::pair<const char*, const char*>>& argument_messages();

// The element types the kernels read (complex tensors: their moduli, or their real views to scale).
bool supported_dtype(at::ScalarType type);

// The validated inputs of one call: complex tensors replaced by their moduli (write=false: the
// statistics are those torch computes) or by their real views (write=true: scaled in place).
// write=true (scale_) also rejects tensors whose elements share memory; write=false replaces the
// tensors the kernels cannot walk (is_walkable) by contiguous copies.
std::vector<at::Tensor> prepare_tensors(at::TensorList tensors, const char* op, bool write);

// Elements from a tensor's first element to one past the furthest one it reaches (0 when empty):
// what it needs of its storage beyond its storage offset.
int64_t element_reach(c10::IntArrayRef sizes, c10::IntArrayRef strides);

// Whether a tensor of `reach` elements (element_reach) at storage_offset fits in `storage_bytes`.
// A storage resized in place (FSDP frees and re-allocates flat parameters that way) can leave a
// view that reaches past its end; torch does not check that, the kernels must not read there.
bool within_storage(int64_t storage_offset, int64_t reach, int64_t itemsize, size_t storage_bytes);

// Whether the kernels walk t in place: dense, or at most kMaxLayoutDims dimensions that cannot be
// merged (layout.h). Torch allows more; such views are rare (a tensor sliced in 17 dimensions).
bool is_walkable(const at::Tensor& t);

// The positions of the tensors that are not walkable (the kernels skip them).
std::vector<int64_t> unwalkable(const std::vector<at::Tensor>& tensors);

// scale_ of those tensors (`which`, from unwalkable) with ATen ops on the device: the same factor
// (coef when < 1 or NaN, else nothing changes) and the same zeroing as the kernels.
void scale_unwalkable(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& which,
                      const at::Tensor& coef, const std::optional<at::Tensor>& zero_nonfinite);

// The walk (layout.h) of tensor `index` of a validated list; raises for a tensor that is not
// walkable, which callers never pass.
Layout tensor_layout(const at::Tensor& t, int64_t index, const char* op);

NormSpec parse_norm_type(double norm_type);
double parse_max_norm(double max_norm);
Nonfinite parse_nonfinite(c10::string_view name);
DType dtype_tag(at::ScalarType type);

// The dtype of the norms and the clip coefficient: float64 when any input is float64 or when
// wide (callers that combine statistics further), else float32 (so that float16/bfloat16 norms
// cannot overflow).
at::ScalarType norm_dtype(const std::vector<at::Tensor>& tensors, bool wide);

struct StatsOutputs {
  at::Tensor total_norm;  // 0-dim, norm_dtype
  at::Tensor clip_coef;   // 0-dim, norm_dtype
  at::Tensor norms;       // [n], norm_dtype
  at::Tensor counts;      // int64 [kCountRows, n + 1] (partial.h); column n holds the totals
};

// The stats op's outputs for n tensors on `device`, norms and coefficient in `dtype`.
StatsOutputs allocate_stats_outputs(c10::Device device, int64_t n, at::ScalarType dtype);

// Checks scale_'s coefficient (one floating value on the device of the n tensors) and its optional
// per-tensor non-finite counts (int64 [n], same device). Returns the counts, if given.
std::optional<at::Tensor> check_scale_args(c10::Device device, int64_t n, const at::Tensor& coef,
                                           const std::optional<at::Tensor>& zero_nonfinite);

// feature_stats' input, validated: its contiguous data, seen as [outer, features, inner].
struct FeatureInput {
  at::Tensor data;
  FeatureShape shape;
};

// Checks feature_stats' arguments (a dense floating tensor of at least one dimension, dim within
// them, the feature dimension not empty) and returns the data to read.
FeatureInput prepare_feature_input(const at::Tensor& input, int64_t dim);

}  // namespace gradstats
