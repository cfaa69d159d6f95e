// What the CPU and CUDA kernels share: the statistics of one piece of a tensor (a Partial), how
// partials combine in a fixed order, and how the combined statistics become the norms and the clip
// coefficient. Plain C++ (host and device), no torch dependency.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ inline
#else
#define GS_HD inline
#endif

namespace gradstats {

enum class NormKind : int32_t { kL1 = 0, kL2 = 1, kInf = 2, kP = 3 };

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
  double p;  // 1, 2, inf or the general exponent
};

// Rows of the stats op's counts output, int64 [kCountRows, n + 1]; column n holds the totals.
constexpr int64_t kCountRows = 3;
constexpr int64_t kNanRow = 0;
constexpr int64_t kInfRow = 1;
constexpr int64_t kNonfiniteRow = 2;

// torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing max_norm by it.
constexpr double kClipEps = 1e-6;

// A partial sum above 2^kRescaleBits is rescaled, so that adding another (also rescaled) one can
// never overflow a double.
constexpr int kRescaleBits = 512;
constexpr double kRescaleAbove = 0x1p512;

// Statistics of a piece of a tensor: the sum of |x|^p over its finite elements, kept as
// sum * 2^(p * exp) so that finite inputs never overflow (for p = inf: the largest |x|, exp = 0),
// and the numbers of NaN and +-Inf elements.
struct Partial {
  double sum;
  int64_t nan;
  int64_t inf;
  int32_t exp;
};

GS_HD Partial empty_partial() { return Partial{0.0, 0, 0, 0}; }

GS_HD NormSpec make_norm_spec(double p) {
  if (p == 1.0) return NormSpec{NormKind::kL1, 1.0};
  if (p == 2.0) return NormSpec{NormKind::kL2, 2.0};
  if (std::isinf(p)) return NormSpec{NormKind::kInf, p};
  return NormSpec{NormKind::kP, p};
}

// |x|^p of one element (for p = inf: |x|, combined by max instead of sum).
GS_HD double pow_term(double abs_x, NormSpec spec) {
  switch (spec.kind) {
    case NormKind::kL2:
      return abs_x * abs_x;
    case NormKind::kP:
      return pow(abs_x, spec.p);
    default:
      return abs_x;
  }
}

// The multiplier 2^(p * k) that moves k powers of two between a sum and its exponent.
GS_HD double exp_factor(int32_t k, NormSpec spec) {
  switch (spec.kind) {
    case NormKind::kL1:
      return ldexp(1.0, k);
    case NormKind::kL2:
      return ldexp(1.0, 2 * k);
    default:
      return exp2(spec.p * k);
  }
}

// Moves powers of two from a (finite) sum into its exponent until the sum is below kRescaleAbove.
GS_HD void rescale(double& sum, int32_t& exp, NormSpec spec) {
  if (spec.kind == NormKind::kInf || !(sum > kRescaleAbove)) return;
  const int32_t step = static_cast<int32_t>(ceil(kRescaleBits / spec.p));
  while (sum > kRescaleAbove && sum <= std::numeric_limits<double>::max()) {
    sum *= exp_factor(-step, spec);
    exp += step;
  }
}

// acc <- acc + x. Callers combine in a fixed order, which makes results bitwise reproducible.
GS_HD void combine(Partial& acc, const Partial& x, NormSpec spec) {
  acc.nan += x.nan;
  acc.inf += x.inf;
  if (spec.kind == NormKind::kInf) {
    acc.sum = fmax(acc.sum, x.sum);
    return;
  }
  if (x.exp == acc.exp) {
    acc.sum += x.sum;
  } else if (x.exp > acc.exp) {
    acc.sum = acc.sum * exp_factor(acc.exp - x.exp, spec) + x.sum;
    acc.exp = x.exp;
  } else {
    acc.sum += x.sum * exp_factor(x.exp - acc.exp, spec);
  }
  rescale(acc.sum, acc.exp, spec);
}

// The norm of the finite elements: (sum * 2^(p * exp))^(1/p) = sum^(1/p) * 2^exp.
GS_HD double finite_norm(const Partial& a, NormSpec spec) {
  switch (spec.kind) {
    case NormKind::kL1:
      return ldexp(a.sum, a.exp);
    case NormKind::kL2:
      return ldexp(sqrt(a.sum), a.exp);
    case NormKind::kInf:
      return a.sum;
    default:
      return ldexp(pow(a.sum, 1.0 / spec.p), a.exp);
  }
}

// The norm the op reports: NaN/Inf as torch.nn.utils would compute them, unless zeroing.
GS_HD double reported_norm(const Partial& a, NormSpec spec, Nonfinite policy) {
  if (policy != Nonfinite::kZero) {
    if (a.nan > 0) return std::numeric_limits<double>::quiet_NaN();
    if (a.inf > 0) return std::numeric_limits<double>::infinity();
  }
  return finite_norm(a, spec);
}

// min(1, max_norm / (total + eps)) in the norm's dtype T (float or double), computed as torch
// computes it (the reciprocal, then the product) so that both clip by the same factor. A NaN norm
// gives a NaN coefficient, as in torch; kSkip with any non-finite element gives 1 (clip nothing).
template <typename T>
GS_HD T clip_coefficient(T total, double max_norm, const Partial& all, Nonfinite policy) {
  if (policy == Nonfinite::kSkip && all.nan + all.inf > 0) return T(1);
  const T coef = (T(1) / (total + T(kClipEps))) * T(max_norm);
  return (coef < T(1) || coef != coef) ? coef : T(1);
}

// Exact statistics of n elements read through load(i) -> double: counts every NaN and Inf, sums
// |x|^p over the finite ones and, only if that plain sum overflows, sums again on the scale of the
// largest finite element. The fast paths fall back to this for any piece that is not all finite.
template <typename Load>
GS_HD Partial exact_partial(Load load, int64_t n, NormSpec spec) {
  Partial r = empty_partial();
  double max_abs = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(i);
    if (std::isnan(x)) {
      ++r.nan;
    } else if (std::isinf(x)) {
      ++r.inf;
    } else {
      const double a = fabs(x);
      max_abs = fmax(max_abs, a);
      r.sum = spec.kind == NormKind::kInf ? fmax(r.sum, a) : r.sum + pow_term(a, spec);
    }
  }
  if (spec.kind == NormKind::kInf || std::isfinite(r.sum)) {
    rescale(r.sum, r.exp, spec);
    return r;
  }
  int32_t e = 0;
  frexp(max_abs, &e);  // max_abs = m * 2^e with m in [0.5, 1): every scaled term is <= 1
  double scaled = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(i);
    if (std::isfinite(x)) scaled += pow_term(ldexp(fabs(x), -e), spec);
  }
  r.sum = scaled;
  r.exp = e;
  rescale(r.sum, r.exp, spec);
  return r;
}

}  // namespace gradstats
