// The one place that declares the gradstats ops: their schemas. The kernels are registered per
// device in cpu/ and cuda/ (TORCH_LIBRARY_IMPL), the fakes for torch.compile in gradstats/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(gradstats, m) {
  // One pass over every tensor (all of one device, any mix of floating dtypes): per-tensor norms
  // and NaN/Inf counts, the total norm and the clip coefficient min(1, max_norm / (total + 1e-6)).
  // counts is int64 [3, n + 1]: rows NaN, Inf, NaN + Inf; column n holds the totals.
  // on_nonfinite: "propagate" | "skip" | "zero" (see csrc/partial.h, Nonfinite). wide: the norms
  // and the coefficient in float64 whatever the inputs, for callers that combine them further.
  m.def(
      "stats(Tensor[] tensors, float norm_type, float max_norm, str on_nonfinite, bool wide=False)"
      " -> (Tensor total_norm, Tensor clip_coef, Tensor norms, Tensor counts)");
  // tensors *= coef in place, coef read on the device; nothing is read or written when coef >= 1.
  // With zero_nonfinite (per-tensor non-finite counts), the NaN/Inf elements of the tensors whose
  // count is positive are set to 0.
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef, Tensor? zero_nonfinite=None) -> ()");
  // Per-feature statistics of one input, feature dimension `dim` (the last for tabular and sequence
  // inputs, 1 for NCHW images): float64 [7, size(dim)], rows finite count, sum, sum of squares,
  // NaN count, Inf count, -min, max (see csrc/feature_stats.h). Read in one pass, on the device.
  m.def("feature_stats(Tensor input, int dim) -> Tensor");
}
