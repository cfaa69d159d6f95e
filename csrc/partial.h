// What the CPU and CUDA kernels share: the statistics of one piece of a tensor (a Partial), how
// partials combine in a fixed order, and how the combined statistics become the norms and the clip
// coefficient. Plain C++ (host and device), no torch dependency.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ inline
// Combining partials runs once per piece and per tensor: inlined, it costs a few instructions.
#define GS_HD_HOT __host__ __device__ __forceinline__
#else
#define GS_HD inline
#define GS_HD_HOT inline __attribute__((always_inline))
#endif

namespace gradstats {

// The p of a p-norm, as the kernels compute it. Every norm_type torch accepts maps to one:
//   kL1, kL2, kP: (sum |x|^p)^(1/p) for p = 1, 2 and any other p > 0;
//   kInf:         max |x|;
//   kZero:        the number of nonzero elements (torch's "0-norm");
// and, with NormSpec::reciprocal, the negative orders: for p = -q < 0, (sum |x|^-q)^(-1/q), which a
// zero element makes 0; for -inf, min |x|.
enum class NormKind : int32_t { kL1 = 0, kL2 = 1, kInf = 2, kP = 3, kZero = 4 };

// What the statistics op does with NaN/Inf elements (the Python API adds "error" on top):
//   kPropagate: norms are NaN (any NaN) or Inf (any Inf), as torch.nn.utils computes them;
//   kSkip:      norms as kPropagate, but the clip coefficient is 1 when anything is non-finite;
//   kZero:      norms and the coefficient come from the finite elements only.
enum class Nonfinite : int32_t { kPropagate = 0, kSkip = 1, kZero = 2 };

// The element types the kernels read; a tag per tensor lets one launch cover every dtype.
enum class DType : int32_t { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Bytes per element of a DType.
GS_HD constexpr int itemsize(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

struct NormSpec {
  NormKind kind;
  double p;         // 1, 2, inf, 0 or the general exponent, always >= 0
  bool reciprocal;  // a negative order: the norm of y = 1 / |x|, inverted (see NormKind)
};

// Rows of the stats op's counts output, int64 [kCountRows, n + 1]; column n holds the totals.
constexpr int64_t kCountRows = 3;
constexpr int64_t kNanRow = 0;
constexpr int64_t kInfRow = 1;
constexpr int64_t kNonfiniteRow = 2;

// torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing max_norm by it.
constexpr double kClipEps = 1e-6;

// A float-lane sum of squares (the fast paths of both devices) below this may have lost tiny terms
// to underflow: each float operation errs by at most 2^-150 absolute once its result is subnormal,
// and a row or chunk has at most 2^16 elements, so above 2^-100 the loss is below 2^-33 relative.
// Such sums are recomputed in double unless every element is zero. A sum of |x| loses nothing:
// |x| is exact, and so is the sum of subnormals.
constexpr double kUnderflowGuard = 0x1p-100;

// A partial sum above 2^kRescaleBits is rescaled, so that adding another (also rescaled) one can
// never overflow a double.
constexpr int kRescaleBits = 512;
constexpr double kRescaleAbove = 0x1p512;

// Statistics of a piece of a tensor: the numbers of NaN and +-Inf elements and, over its finite
// elements, sum and scale, kept so that no finite input overflows or underflows them:
//   p = 1, 2:  sum * scale^p = sum |x|^p, scale a power of two (1 until the sum needs rescaling);
//   p > 0:     the same with scale = the largest |x|: terms (|x| / scale)^p are at most 1 and the
//              largest is exactly 1, so no p, however large, loses the sum to underflow;
//   inf:       sum = the largest |x| (scale unused);
//   0:         sum = the count of nonzero elements;
//   p = -q:    scale = the smallest |x|, sum = sum (scale / |x|)^q (again terms at most 1);
//   -inf:      scale = the smallest |x|, sum = 1.
// sum = 0 means no finite element (an empty partial). For the negative orders a zero element makes
// the norm 0, marked by sum = +inf.
struct Partial {
  double sum;
  int64_t nan;
  int64_t inf;
  double scale;
};

GS_HD Partial empty_partial() { return Partial{0.0, 0, 0, 1.0}; }

GS_HD NormSpec make_norm_spec(double norm_type) {
  const bool reciprocal = norm_type < 0.0;
  const double p = fabs(norm_type);
  if (p == 0.0) return NormSpec{NormKind::kZero, 0.0, false};
  if (std::isinf(p)) return NormSpec{NormKind::kInf, p, reciprocal};
  if (p == 1.0 && !reciprocal) return NormSpec{NormKind::kL1, 1.0, false};
  if (p == 2.0 && !reciprocal) return NormSpec{NormKind::kL2, 2.0, false};
  return NormSpec{NormKind::kP, p, reciprocal};
}

// Whether the kernels' vectorised sums serve this norm (else every piece takes exact_partial).
GS_HD bool has_fast_path(NormSpec spec) {
  return !spec.reciprocal &&
         (spec.kind == NormKind::kL1 || spec.kind == NormKind::kL2 || spec.kind == NormKind::kInf);
}

// r^p for a ratio r <= 1 of two scales: exact for the powers of two of p = 1, 2.
GS_HD_HOT double scale_power(double r, NormSpec spec) {
  switch (spec.kind) {
    case NormKind::kL1:
      return r;
    case NormKind::kL2:
      return r * r;
    default:
      return pow(r, spec.p);
  }
}

// Moves powers of two from a finite p = 1, 2 sum into its scale until the sum is below
// kRescaleAbove. (General p sums are at most the element count: they never need it.)
GS_HD_HOT void rescale(Partial& a, NormSpec spec) {
  if (spec.kind != NormKind::kL1 && spec.kind != NormKind::kL2) return;
  // sum * scale^p stays the same: 2^-kRescaleBits off the sum is 2^(kRescaleBits / p) on the scale.
  const int scale_bits = spec.kind == NormKind::kL1 ? kRescaleBits : kRescaleBits / 2;
  while (a.sum > kRescaleAbove && a.sum <= std::numeric_limits<double>::max()) {
    a.sum = ldexp(a.sum, -kRescaleBits);
    a.scale = ldexp(a.scale, scale_bits);
  }
}

// acc <- acc + x. Callers combine in a fixed order, which makes results bitwise reproducible.
GS_HD_HOT void combine(Partial& acc, const Partial& x, NormSpec spec) {
  acc.nan += x.nan;
  acc.inf += x.inf;
  if (spec.kind == NormKind::kInf && !spec.reciprocal) {
    acc.sum = fmax(acc.sum, x.sum);
    return;
  }
  if (spec.kind == NormKind::kZero || x.sum == 0.0) {
    acc.sum += x.sum;  // counts add; an empty x adds nothing
    return;
  }
  if (acc.sum == 0.0) {
    acc.sum = x.sum;  // acc held nothing yet: take x on its own scale
    acc.scale = x.scale;
    return;
  }
  if (std::isinf(x.sum) || std::isinf(acc.sum)) {
    acc.sum = std::numeric_limits<double>::infinity();  // a negative order met a zero: norm 0
    return;
  }
  if (spec.kind == NormKind::kInf) {
    acc.scale = fmin(acc.scale, x.scale);  // -inf: the smallest |x|
    return;
  }
  // The part on the dominant scale (the larger for p > 0, the smaller for p < 0) keeps its terms;
  // the other's are multiplied by the ratio of the scales (at most 1) to the power |p|.
  const bool x_dominates = spec.reciprocal ? x.scale < acc.scale : x.scale > acc.scale;
  if (x_dominates) {
    const double ratio = spec.reciprocal ? x.scale / acc.scale : acc.scale / x.scale;
    acc.sum = acc.sum * scale_power(ratio, spec) + x.sum;
    acc.scale = x.scale;
  } else {
    const double ratio = spec.reciprocal ? acc.scale / x.scale : x.scale / acc.scale;
    acc.sum += x.sum * scale_power(ratio, spec);
  }
  rescale(acc, spec);
}

// The norm of the finite elements.
GS_HD double finite_norm(const Partial& a, NormSpec spec) {
  if (spec.reciprocal) {
    if (a.sum == 0.0) return std::numeric_limits<double>::infinity();  // no finite element
    if (std::isinf(a.sum)) return 0.0;                                 // a zero element
    return spec.kind == NormKind::kInf ? a.scale : a.scale * pow(a.sum, -1.0 / spec.p);
  }
  switch (spec.kind) {
    case NormKind::kL1:
      return a.sum * a.scale;
    case NormKind::kL2:
      return sqrt(a.sum) * a.scale;
    case NormKind::kP:
      return pow(a.sum, 1.0 / spec.p) * a.scale;
    default:
      return a.sum;
  }
}

// The norm the op reports for a tensor, as torch.linalg.vector_norm computes it unless zeroing:
// a NaN makes it NaN, except for the 0 "norm", which counts NaN and Inf as nonzero; an Inf makes a
// p > 0 norm Inf, and adds nothing to a negative order's (|inf|^p = 0, and min |x| ignores it).
GS_HD double reported_norm(const Partial& a, NormSpec spec, Nonfinite policy) {
  if (policy != Nonfinite::kZero) {
    if (spec.kind == NormKind::kZero) return a.sum + static_cast<double>(a.nan + a.inf);
    if (a.nan > 0) return std::numeric_limits<double>::quiet_NaN();
    if (a.inf > 0 && !spec.reciprocal) return std::numeric_limits<double>::infinity();
  }
  return finite_norm(a, spec);
}

// What a tensor adds to the call's total: its partial (the total is the norm of all elements, which
// is the norm of the tensors' norms), except for the 0 "norm", whose total torch takes as the
// 0 "norm" of the per-tensor norms: the number of tensors with a nonzero norm.
GS_HD Partial total_term(const Partial& tensor, NormSpec spec, Nonfinite policy) {
  if (spec.kind != NormKind::kZero) return tensor;
  Partial r = tensor;
  r.sum = reported_norm(tensor, spec, policy) != 0.0 ? 1.0 : 0.0;
  return r;
}

// The total norm the op reports, from the combined total_terms of every tensor.
GS_HD double reported_total(const Partial& all, NormSpec spec, Nonfinite policy) {
  return spec.kind == NormKind::kZero ? all.sum : reported_norm(all, spec, policy);
}

// min(1, max_norm / (total + eps)) in the norm's dtype T (float or double), computed as torch
// computes it (the reciprocal, then the product) so that both clip by the same factor. A NaN norm
// gives a NaN coefficient, as in torch. A finite norm beyond T's range (float32 gradients whose
// norm exceeds 3.4e38) takes the coefficient from the exact norm: finite gradients are clipped,
// never zeroed by an overflow. kSkip gives 1 (clip nothing) when any element is NaN/Inf or the norm
// is.
template <typename T>
GS_HD T clip_coefficient(double norm, double max_norm, const Partial& all, Nonfinite policy) {
  const T total = static_cast<T>(norm);
  const bool total_finite = total - total == T(0);
  if (policy == Nonfinite::kSkip && (all.nan + all.inf > 0 || !total_finite)) return T(1);
  if (!total_finite && norm - norm == 0.0) {
    const double exact = (1.0 / (norm + kClipEps)) * max_norm;
    return static_cast<T>(exact < 1.0 ? exact : 1.0);
  }
  const T coef = (T(1) / (total + T(kClipEps))) * T(max_norm);
  return (coef < T(1) || coef != coef) ? coef : T(1);
}

// Whether scale_ changes the tensors for a coefficient: below 1, or NaN (which propagates, as in
// torch).
GS_HD_HOT bool clips(double coef) { return !(coef >= 1.0); }

// Column `col` of the stats op's counts (int64 [kCountRows, n + 1], row-major): a partial's NaN,
// Inf and NaN + Inf counts.
GS_HD_HOT void store_counts(int64_t* counts, int64_t n, int64_t col, const Partial& p) {
  counts[kNanRow * (n + 1) + col] = p.nan;
  counts[kInfRow * (n + 1) + col] = p.inf;
  counts[kNonfiniteRow * (n + 1) + col] = p.nan + p.inf;
}

// The stats op's total norm and clip coefficient, in the norms' dtype T, from the combined
// total_terms of every tensor.
template <typename T>
GS_HD void store_total(T* total_norm, T* clip_coef, const Partial& all, NormSpec spec,
                       Nonfinite policy, double max_norm) {
  const double total = reported_total(all, spec, policy);
  *total_norm = static_cast<T>(total);
  *clip_coef = clip_coefficient<T>(total, max_norm, all, policy);
}

// The term an element of magnitude a adds to a p = 1, 2, 0 sum: a, a^2 or whether it is nonzero.
GS_HD double plain_term(double a, NormSpec spec) {
  switch (spec.kind) {
    case NormKind::kL2:
      return a * a;
    case NormKind::kZero:
      return a != 0.0 ? 1.0 : 0.0;
    default:
      return a;
  }
}

// Exact statistics of n elements read through load(i) -> double: counts every NaN and Inf and, over
// the finite ones, the Partial of the norm: for inf the largest |x|, for 0 the count of nonzeros;
// for a general or negative order two passes (the scale, then the terms on it); for p = 1, 2 the
// plain sum, and only if that overflows, the sum again on the scale of the largest |x|. The fast
// paths fall back to this for any piece that is not all finite, and every piece of a general or
// negative order comes here.
template <typename Load>
GS_HD Partial exact_partial(Load load, int64_t n, NormSpec spec) {
  Partial r = empty_partial();
  double max_abs = 0.0;
  double min_abs = std::numeric_limits<double>::infinity();
  bool any_finite = false;
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(i);
    if (std::isnan(x)) {
      ++r.nan;
    } else if (std::isinf(x)) {
      ++r.inf;
    } else {
      const double a = fabs(x);
      any_finite = true;
      max_abs = fmax(max_abs, a);
      min_abs = fmin(min_abs, a);
      if (spec.kind == NormKind::kInf) {
        r.sum = fmax(r.sum, a);
      } else if (spec.kind != NormKind::kP) {
        r.sum += plain_term(a, spec);
      }
    }
  }
  if (spec.reciprocal) {
    if (!any_finite) return r;  // no finite element: an empty partial (its norm is inf)
    if (min_abs == 0.0) {
      r.sum = std::numeric_limits<double>::infinity();  // a zero: the norm is 0
      return r;
    }
    r.scale = min_abs;
    r.sum = spec.kind == NormKind::kInf ? 1.0 : 0.0;
    if (spec.kind == NormKind::kP) {
      for (int64_t i = 0; i < n; ++i) {
        const double x = load(i);
        if (std::isfinite(x)) r.sum += pow(min_abs / fabs(x), spec.p);
      }
    }
    return r;
  }
  if (spec.kind == NormKind::kInf || spec.kind == NormKind::kZero || max_abs == 0.0) return r;
  if (spec.kind != NormKind::kP && std::isfinite(r.sum)) {
    rescale(r, spec);
    return r;
  }
  // The sum on the scale of the largest |x|: a power of two for p = 1, 2 (their sums stay exact
  // multiples), max |x| itself for a general p (the largest term is then exactly 1).
  int e = 0;
  frexp(max_abs, &e);  // max_abs = m * 2^e with m in [0.5, 1)
  r.scale = spec.kind == NormKind::kP ? max_abs : ldexp(1.0, e);
  double scaled = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(i);
    if (!std::isfinite(x)) continue;
    const double y = fabs(x) / r.scale;
    scaled += spec.kind == NormKind::kP ? pow(y, spec.p) : plain_term(y, spec);
  }
  r.sum = scaled;
  rescale(r, spec);
  return r;
}

}  // namespace gradstats
