// The CUDA kernels of the gradstats ops (launched by kernels.cu; host side: ops_cuda.cpp). Device
// code only, in a header so that tests/cpp/test_kernels.cpp can also run it on the host.
//
// stats: a persistent grid walks the launch's chunk list; each block reduces a chunk to a Partial
// (partial.h). A tensor of one chunk is finished at once by the block that read it. A tensor of
// several chunks has its chunk partials written to a workspace and counted per tensor (a counter
// after a fence); the block whose chunk completes the count combines them in a fixed order and
// writes the tensor's norm and counts. So the tensors are finished across the grid, as their data
// is read. In the call's last launch, the last block to finish (a second counter) combines all
// tensors' partials in a fixed order into the total norm, total counts and clip coefficient. No
// floating-point atomics: the same inputs give bitwise the same outputs, whatever the grid, the
// order the blocks run in, or the split of the list into launches.
//
// scale_: reads the coefficient on the device; when it is >= 1 and nothing is to be zeroed, every
// block returns before touching a tensor.
#pragma once

#include <cmath>

#include "cuda/device.cuh"
#include "cuda/launch.h"
#include "partial.h"

namespace gradstats::gpu {
namespace {

// What a thread brings to the fast path's reduction: the sum of |x|^p (max |x| for inf) and, when
// float lanes square, the largest |x| to tell an underflowed sum from a zero one.
struct FastSum {
  double sum;
  double amax;
};

__device__ __forceinline__ FastSum shfl_down(const FastSum& v, int offset) {
  return FastSum{__shfl_down_sync(kFullMask, v.sum, offset),
                 __shfl_down_sync(kFullMask, v.amax, offset)};
}

// acc with the term of |x| = a added: its square, itself, or a max that keeps a NaN (which then
// sends the chunk to the exact path, as an Inf does).
template <NormKind K, typename S>
__device__ __forceinline__ S add_term(S acc, S a) {
  if constexpr (K == NormKind::kL2) {
    return fma(a, a, acc);
  } else if constexpr (K == NormKind::kL1) {
    return acc + a;
  } else {
    return (a > acc || a != a) ? a : acc;
  }
}

template <NormKind K>
__device__ __forceinline__ double merge_terms(double a, double b) {
  return K == NormKind::kInf ? ((b > a || b != b) ? b : a) : a + b;
}

template <NormKind K>
__device__ __forceinline__ FastSum merge_fast(const FastSum& a, const FastSum& b) {
  return FastSum{merge_terms<K>(a.sum, b.sum), fmax(a.amax, b.amax)};
}

// The fast path's per-thread accumulation for p = 1, 2 or inf. A pack's terms are summed in
// opmath (float lanes: at most 8 terms, so a relative error below 8 * 2^-24 < 1e-6 whatever the
// chunk holds), then added to one of kLoadsInFlight double accumulators. kPrecise sums every term
// in double (the underflow re-run).
template <typename T, NormKind K, bool kPrecise>
struct SumVisit {
  using S = std::conditional_t<kPrecise, double, opmath_t<T>>;
  static constexpr bool kTracksMax = K == NormKind::kL2 && std::is_same_v<S, float>;

  double acc[kLoadsInFlight] = {};
  S amax = 0;

  __device__ __forceinline__ S term_of(T x) {
    const S a = fabs(static_cast<S>(to_opmath(x)));
    if constexpr (kTracksMax) amax = fmax(amax, a);
    return a;
  }
  __device__ __forceinline__ void element(const T& x, int slot) {
    acc[slot] = merge_terms<K>(acc[slot], static_cast<double>(add_term<K>(S(0), term_of(x))));
  }
  __device__ __forceinline__ void pack(const Pack<T>& v, int slot) {
    S s = 0;
#pragma unroll
    for (int e = 0; e < kPerPack<T>; ++e) s = add_term<K>(s, term_of(v.x[e]));
    acc[slot] = merge_terms<K>(acc[slot], static_cast<double>(s));
  }
  __device__ __forceinline__ FastSum result() const {
    double r = acc[0];
#pragma unroll
    for (int k = 1; k < kLoadsInFlight; ++k) r = merge_terms<K>(r, acc[k]);
    return FastSum{r, static_cast<double>(amax)};
  }
};

// Shared memory of a stats block: reduction scratch, and the flag through which thread 0 tells the
// block that its count was the last (counted_last).
struct Scratch {
  FastSum fast[kWarps];
  Partial partial[kWarps];
  bool last;
};

struct CombineOp {
  NormSpec spec;
  __device__ __forceinline__ Partial operator()(Partial a, const Partial& b) const {
    combine(a, b, spec);
    return a;
  }
};

// Partials written by other blocks: read from L2, where their fences put them.
__device__ __forceinline__ Partial load_partial(const Partial* p) {
  Partial r;
  r.sum = __ldcg(&p->sum);
  r.nan = __ldcg(reinterpret_cast<const long long*>(&p->nan));
  r.inf = __ldcg(reinterpret_cast<const long long*>(&p->inf));
  r.scale = __ldcg(&p->scale);
  return r;
}

// The per-chunk work of each dtype (and norm) is a function of its own, called once per chunk:
// ptxas then allocates each path's registers on its own instead of across all of them at once.

// The block's sum of |x|^p over a chunk (max |x| for inf) on the fast path: NaN or Inf when the
// chunk holds a NaN or Inf or overflows, and the caller takes the exact path.
template <typename T, NormKind K>
__device__ __noinline__ double fast_sum(ChunkView<T> view, FastSum* scratch) {
  SumVisit<T, K, false> visit;
  walk_chunk<false>(view, visit);
  FastSum r = block_allreduce(visit.result(), merge_fast<K>, scratch);
  if constexpr (SumVisit<T, K, false>::kTracksMax) {
    if (isfinite(r.sum) && r.sum < kUnderflowGuard && r.amax != 0.0) {
      SumVisit<T, K, true> precise;
      walk_chunk<false>(view, precise);
      r = block_allreduce(precise.result(), merge_fast<K>, scratch);
    }
  }
  return r.sum;
}

// Exact statistics of a chunk (partial.h: exact_partial): every NaN and Inf counted, overflow
// rescaled. Each thread takes every kThreads-th element, so that the loads coalesce.
template <typename T>
__device__ __noinline__ Partial exact_chunk(ChunkView<T> view, NormSpec spec, Partial* scratch) {
  assume_spaces(view);
  const int tid = threadIdx.x;
  const int64_t count = view.len > tid ? (view.len - tid + kThreads - 1) / kThreads : 0;
  const auto load = [&](int64_t i) {
    return static_cast<double>(to_opmath(view.base[view.offset(view.begin + tid + i * kThreads)]));
  };
  return block_allreduce(exact_partial(load, count, spec), CombineOp{spec}, scratch);
}

template <typename T>
__device__ __forceinline__ Partial chunk_partial(const ChunkView<T>& view, NormSpec spec,
                                                 Scratch& scratch) {
  // A general p or a reciprocal order: pow per element in double on the exact path, as on the CPU.
  double sum = NAN;
  switch (has_fast_path(spec) ? spec.kind : NormKind::kP) {
    case NormKind::kL2:
      sum = fast_sum<T, NormKind::kL2>(view, scratch.fast);
      break;
    case NormKind::kL1:
      sum = fast_sum<T, NormKind::kL1>(view, scratch.fast);
      break;
    case NormKind::kInf:
      sum = fast_sum<T, NormKind::kInf>(view, scratch.fast);
      break;
    default:
      break;
  }
  if (!isfinite(sum)) return exact_chunk<T>(view, spec, scratch.partial);
  Partial p = empty_partial();
  p.sum = sum;
  rescale(p, spec);
  return p;
}

// Counts this block's finished work in *counter; true, in every thread of the block, when this
// count was the total-th. What the counted blocks wrote before counting is then visible to this
// block: each thread's fence orders its writes before the count (release), thread 0's fence after
// the count orders the block's later reads after the others' counts (acquire).
__device__ __forceinline__ bool counted_last(unsigned int* counter, unsigned int total,
                                             Scratch& scratch) {
  __threadfence();
  __syncthreads();  // every thread's writes are fenced; the previous flag has been read
  if (threadIdx.x == 0) {
    scratch.last = atomicAdd(counter, 1u) == total - 1;
    __threadfence();
  }
  __syncthreads();
  return scratch.last;
}

// Where a tensor's results go: StatsArgs' outputs, copied out of the kernel parameters so that
// finish_tensor can take them by value.
struct TensorOutputs {
  Partial* tensor_partials;
  void* norms;
  int64_t* counts;
  int64_t num_tensors;
  NormSpec spec;
  Nonfinite policy;
  bool out_double;
};

__device__ __forceinline__ TensorOutputs tensor_outputs(const StatsArgs& args) {
  return TensorOutputs{args.tensor_partials, args.norms, args.counts,
                       args.num_tensors,     args.spec,  args.policy,
                       args.out_double};
}

// A tensor's combined partial: kept for the call's total, and written out as its norm and counts.
// Not inlined: called from the chunk loop, its norm (a pow for a general p) would otherwise cost
// the loop registers, which the per-chunk calls then spill.
__device__ __noinline__ void finish_tensor(TensorOutputs out, int64_t g, Partial p) {
  out.tensor_partials[g] = p;
  const double norm = reported_norm(p, out.spec, out.policy);
  if (out.out_double) {
    static_cast<double*>(out.norms)[g] = norm;
  } else {
    static_cast<float*>(out.norms)[g] = static_cast<float>(norm);
  }
  store_counts(out.counts, out.num_tensors, g, p);
}

// The combination of a tensor's `chunks` chunk partials at `partials`, in thread 0: a warp for at
// most kWarpSize chunks (a lane per chunk, then a warp tree), the whole block for more (each thread
// every kThreads-th chunk, then a block tree). Either order depends only on the chunk count, so the
// result depends neither on the grid nor on the list the tensor is in. One load in flight per
// thread: more would cost the chunk loop registers (the kernel spilled), and the block path serves
// only tensors of over kWarpSize chunks, whose reading takes far longer.
__device__ __forceinline__ Partial combine_chunks(const Partial* partials, int32_t chunks,
                                                  NormSpec spec, Partial* scratch) {
  const CombineOp op{spec};
  if (chunks <= kWarpSize) {
    if (threadIdx.x >= kWarpSize) return empty_partial();
    const int lane = static_cast<int>(threadIdx.x);
    const Partial acc = lane < chunks ? load_partial(partials + lane) : empty_partial();
    return warp_reduce(acc, op);
  }
  Partial acc = empty_partial();
#pragma unroll 1
  for (int32_t c = static_cast<int32_t>(threadIdx.x); c < chunks; c += kThreads) {
    acc = op(acc, load_partial(partials + c));
  }
  return block_allreduce(acc, op, scratch);
}

// What the block does with the partial p of chunk c (launch index): a tensor of one chunk is
// finished by thread 0 from p itself (no workspace, no counter, no shuffle); otherwise p goes to
// the workspace, and the block that completes the tensor's count combines them all. The chunk's
// tensor is located again rather than kept from before the chunk's walk: values live across the
// per-chunk calls cost registers that those calls then spill.
template <class Table>
__device__ __forceinline__ void finish_chunk(const Table& table, const StatsArgs& args, int32_t c,
                                             const Partial& p, Scratch& scratch) {
  const int32_t t = locate_chunk(table, c).tensor;
  const int32_t first = tensor_first_chunk(table, t);
  const int32_t chunks = table.chunk_end[t] - first;
  const int64_t g = table.first_tensor + t;
  if (chunks == 1) {
    if (threadIdx.x == 0) finish_tensor(tensor_outputs(args), g, p);
    return;
  }
  if (threadIdx.x == 0) args.chunk_partials[table.first_chunk + c] = p;
  if (!counted_last(args.counters + g, static_cast<unsigned int>(chunks), scratch)) return;
  const Partial all = combine_chunks(args.chunk_partials + table.first_chunk + first, chunks,
                                     args.spec, scratch.partial);
  if (threadIdx.x == 0) finish_tensor(tensor_outputs(args), g, all);
}

// The launch's empty tensors, which no chunk covers: finished (norm 0, no counts) by block 0.
template <class Table>
__device__ __forceinline__ void finish_empty_tensors(const Table& table, const StatsArgs& args) {
  for (int32_t t = static_cast<int32_t>(threadIdx.x); t < table.num_tensors; t += kThreads) {
    if (table.chunk_end[t] == tensor_first_chunk(table, t)) {
      finish_tensor(tensor_outputs(args), table.first_tensor + t, empty_partial());
    }
  }
}

template <typename T>
__device__ __forceinline__ void write_total(const StatsArgs& args, const Partial& all) {
  store_total(static_cast<T*>(args.total_norm), static_cast<T*>(args.clip_coef), all, args.spec,
              args.policy, args.max_norm);
}

// The last block of the call's last launch: all tensors' partials (this launch's written by blocks
// that counted before this one, earlier launches' before this kernel began), combined in a fixed
// order.
__device__ __forceinline__ void write_totals(const StatsArgs& args, Scratch& scratch) {
  __syncthreads();
  const CombineOp op{args.spec};
  Partial acc = empty_partial();
  for (int64_t i = threadIdx.x; i < args.num_tensors; i += kThreads) {
    acc = op(acc, total_term(load_partial(args.tensor_partials + i), args.spec, args.policy));
  }
  acc = block_allreduce(acc, op, scratch.partial);
  if (threadIdx.x != 0) return;
  store_counts(args.counts, args.num_tensors, args.num_tensors, acc);
  if (args.out_double) {
    write_total<double>(args, acc);
  } else {
    write_total<float>(args, acc);
  }
}

template <class Table>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gradstats_stats_kernel(const Table table, const StatsArgs args) {
  __shared__ Scratch scratch;
  if (blockIdx.x == 0) finish_empty_tensors(table, args);
  for (int32_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const ChunkRef ref = locate_chunk(table, c);
    Partial p;
    dispatch_dtype(table.dtype[ref.tensor], [&](auto tag) {
      using T = decltype(tag);
      p = chunk_partial(chunk_view<T>(table, ref), args.spec, scratch);
    });
    finish_chunk(table, args, c, p, scratch);
  }
  if (!args.last_launch) return;
  unsigned int* done_blocks = args.counters + args.num_tensors;
  if (counted_last(done_blocks, gridDim.x, scratch)) write_totals(args, scratch);
}

// x <- x * coef in opmath, or 0 for a NaN/Inf x of a tensor being zeroed.
template <typename T>
struct ScaleVisit {
  opmath_t<T> coef;
  bool zero_nonfinite;

  __device__ __forceinline__ T scaled(T x) const {
    const opmath_t<T> v = to_opmath(x);
    return static_cast<T>(zero_nonfinite && !isfinite(v) ? opmath_t<T>(0) : v * coef);
  }
  __device__ __forceinline__ void element(T& x, int) const { x = scaled(x); }
  __device__ __forceinline__ void pack(Pack<T>& v, int) const {
#pragma unroll
    for (int e = 0; e < kPerPack<T>; ++e) v.x[e] = scaled(v.x[e]);
  }
};

template <typename T>
__device__ __noinline__ void scale_chunk(ChunkView<T> view, opmath_t<T> coef, bool zero_nonfinite) {
  ScaleVisit<T> visit{coef, zero_nonfinite};
  walk_chunk<true>(view, visit);
}

template <class Table>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gradstats_scale_kernel(const Table table, const ScaleArgs args) {
  double coef = 0.0;
  dispatch_dtype(static_cast<int>(args.coef_dtype), [&](auto tag) {
    coef = static_cast<double>(to_opmath(*static_cast<const decltype(tag)*>(args.coef)));
  });
  const bool scales = clips(coef);
  if (!scales && args.zero_counts == nullptr) return;
  for (int32_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const ChunkRef ref = locate_chunk(table, c);
    const bool zero = args.zero_counts != nullptr &&
                      args.zero_counts[(table.first_tensor + ref.tensor) * args.zero_stride] > 0;
    if (!scales && !zero) continue;
    dispatch_dtype(table.dtype[ref.tensor], [&](auto tag) {
      using T = decltype(tag);
      scale_chunk(chunk_view<T>(table, ref), static_cast<opmath_t<T>>(scales ? coef : 1.0), zero);
    });
  }
}

}  // namespace
}  // namespace gradstats::gpu
