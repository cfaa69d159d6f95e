// The vectorised inner loops of the CPU kernels (at::vec; AVX2 when the build enables it).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "partial.h"

namespace gradstats::cpu {

template <typename T>
constexpr bool kIsReduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Element type the arithmetic happens in: float for float/half/bfloat16, double for double.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
using Vec = at::vec::Vectorized<opmath_t<T>>;

// Elements per group: two opmath vectors (one 16-bit vector holds exactly that many).
template <typename T>
constexpr int64_t kGroup = 2 * Vec<T>::size();

// Loads one group as two opmath vectors (16-bit types are widened in registers).
template <typename T>
inline void load_group(const T* p, Vec<T>& a, Vec<T>& b) {
  if constexpr (kIsReduced<T>) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  } else {
    a = Vec<T>::loadu(p);
    b = Vec<T>::loadu(p + Vec<T>::size());
  }
}

template <typename T>
inline void store_group(T* p, const Vec<T>& a, const Vec<T>& b) {
  if constexpr (kIsReduced<T>) {
    at::vec::convert_from_float<T>(a, b).store(p);
  } else {
    a.store(p);
    b.store(p + Vec<T>::size());
  }
}

// Independent accumulators, so that consecutive loads do not wait on one another's add.
constexpr int kAccs = 8;
// Groups between flushes of the accumulators into per-lane double totals. For float lanes that
// bounds each lane's float sum to kFlushGroups * 2 / kAccs = 8 terms (plus three adds combining
// the accumulators), so its relative rounding error stays below 1e-6 however long the row is.
constexpr int64_t kFlushGroups = 32;

// Combines two partial results of norm kind K: sum, or max that propagates NaN (the caller relies
// on a NaN or Inf element making the result non-finite).
template <NormKind K, typename V>
inline V merge(const V& a, const V& b) {
  if constexpr (K == NormKind::kInf) {
    return at::vec::maximum(a, b);
  } else {
    return a + b;
  }
}

template <NormKind K>
inline double merge(double a, double b) {
  if constexpr (K == NormKind::kInf) {
    return std::isnan(a) || a > b ? a : b;
  } else {
    return a + b;
  }
}

template <NormKind K, typename V>
inline V add_term(const V& acc, const V& x) {
  if constexpr (K == NormKind::kL2) {
    return at::vec::fmadd(x, x, acc);
  } else {
    return merge<K>(acc, x.abs());
  }
}

// Combines the accumulators pairwise and adds their lanes to the per-lane double totals.
template <NormKind K, int N, typename V, int L>
inline void flush(V (&acc)[N], double (&totals)[L]) {
  using S = typename V::value_type;
  for (int width = N / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] = merge<K>(acc[k], acc[k + width]);
  }
  alignas(64) S lanes[L];
  acc[0].store(lanes);
  for (int j = 0; j < L; ++j) totals[j] = merge<K>(static_cast<double>(lanes[j]), totals[j]);
  for (V& a : acc) a = V(S(0));
}

// Groups per step: one vector for each accumulator.
constexpr int64_t kStepGroups = kAccs / 2;

// Adds kStepGroups groups at p into the accumulators. Every index is a constant once the loops are
// unrolled, which lets the compiler keep the accumulators in registers.
template <NormKind K, typename T, typename V>
inline void add_step(const T* p, V (&acc)[kAccs]) {
  V x[kAccs];
  for (int k = 0; k < kStepGroups; ++k) load_group(p + k * kGroup<T>, x[2 * k], x[2 * k + 1]);
  for (int k = 0; k < kAccs; ++k) acc[k] = add_term<K>(acc[k], x[k]);
}

// The scalar tail of a row, each term in double: all of a row shorter than one group (a bias, a
// norm's scale), where setting up the vector accumulators would cost more than the sum.
template <NormKind K, typename T>
double scalar_row_sum(const T* p, int64_t n, double total) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(p[i]));
    total = merge<K>(K == NormKind::kL2 ? a * a : a, total);
  }
  return total;
}

template <NormKind K, typename T>
double fast_row_sum(const T* p, int64_t n) {
  if (n < kGroup<T>) return scalar_row_sum<K>(p, n, 0.0);
  using V = Vec<T>;
  using S = opmath_t<T>;
  constexpr int64_t kBlock = kGroup<T> * kFlushGroups;
  constexpr int64_t kStep = kGroup<T> * kStepGroups;
  constexpr int kLanes = V::size();
  double totals[kLanes] = {};  // per-lane double totals: independent adds, combined at the end
  V acc[kAccs];
  for (V& a : acc) a = V(S(0));
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t j = 0; j < kBlock; j += kStep) add_step<K>(p + i + j, acc);
    flush<K>(acc, totals);
  }
  // The rest of the row: fewer than kFlushGroups groups, so each lane still sums at most
  // kFlushGroups / kStepGroups steps plus kStepGroups - 1 single groups.
  for (; i + kStep <= n; i += kStep) add_step<K>(p + i, acc);
  for (; i + kGroup<T> <= n; i += kGroup<T>) {
    V a, b;
    load_group(p + i, a, b);
    acc[0] = add_term<K>(acc[0], a);
    acc[1] = add_term<K>(acc[1], b);
  }
  flush<K>(acc, totals);
  double total = 0.0;
  for (double t : totals) total = merge<K>(t, total);
  return scalar_row_sum<K>(p + i, n - i, total);
}

// Sum of |x|^p (max |x| for inf) over a contiguous row, for p = 1, 2 or inf, with no masking: the
// result is NaN or Inf exactly when some element is non-finite or a float lane overflowed, and then
// the caller recomputes the row exactly (partial.h: exact_partial). Float lanes can also lose terms
// to underflow; the caller checks for that too (kUnderflowGuard).
template <typename T>
double fast_row_sum(const T* p, int64_t n, NormKind kind) {
  switch (kind) {
    case NormKind::kL2:
      return fast_row_sum<NormKind::kL2>(p, n);
    case NormKind::kL1:
      return fast_row_sum<NormKind::kL1>(p, n);
    default:
      return fast_row_sum<NormKind::kInf>(p, n);
  }
}

// x <- x * coef in place over a row of n elements stride apart, in opmath precision; with
// zero_nonfinite, NaN and Inf elements become 0 instead. Vectorised when the row is contiguous.
template <typename T>
void scale_row(T* p, int64_t n, int64_t stride, double coef, bool zero_nonfinite) {
  using V = Vec<T>;
  using S = opmath_t<T>;
  const S c = static_cast<S>(coef);
  const V cv(c);
  const V zero(S(0));
  const int64_t full = stride == 1 ? n - n % kGroup<T> : 0;
  for (int64_t i = 0; i < full; i += kGroup<T>) {
    V a, b;
    load_group(p + i, a, b);
    if (zero_nonfinite) {
      // x - x is 0 for finite x and NaN for NaN and +-Inf.
      a = V::blendv(a * cv, zero, (a - a).isnan());
      b = V::blendv(b * cv, zero, (b - b).isnan());
    } else {
      a = a * cv;
      b = b * cv;
    }
    store_group(p + i, a, b);
  }
  for (int64_t i = full; i < n; ++i) {
    T& x = p[i * stride];
    const S v = static_cast<S>(x);
    x = static_cast<T>(zero_nonfinite && !std::isfinite(v) ? S(0) : v * c);
  }
}

}  // namespace gradstats::cpu
