// The multi-tensor harness shared by the statistics and the scale kernels: dtype dispatch, 16-byte
// packs, the walks over a chunk (flat: vectorised with scalar head and tail; strided: by rows),
// and deterministic block reductions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cuda/launch.h"
#include "cuda/planner.h"
#include "partial.h"

namespace gradstats::gpu {

constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp takes part in its shuffles

// Independent 16-byte loads a thread issues before it uses any of them. Little's law: a GPU needs
// bandwidth x latency bytes in flight, about 4.8 TB/s x 1 us ~ 36 KB per SM of an H200; four loads
// of 1024 resident threads give 64 KB.
constexpr int kLoadsInFlight = 4;

// Element type the arithmetic happens in: float for float/half/bfloat16, double for double (the
// CPU kernels' opmath, so that both devices scale by the same rounded factor).
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr int kPerPack = kVectorBytes / static_cast<int>(sizeof(T));

// One 16-byte load or store.
template <typename T>
struct alignas(kVectorBytes) Pack {
  T x[kPerPack<T>];
};

// Calls f(T{}) with T the element type of a DType tag: one launch serves every dtype.
template <typename F>
__device__ __forceinline__ void dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat64:
      f(double{});
      break;
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(c10::Half{});
      break;
    case DType::kBFloat16:
      f(c10::BFloat16{});
      break;
  }
}

template <typename T>
__device__ __forceinline__ opmath_t<T> to_opmath(T x) {
  return static_cast<opmath_t<T>>(x);
}

// The merged layout (layout.h) of a strided tensor, copied from the table into shared memory for
// the chunks of that tensor: the per-chunk functions, which are not inlined, cannot be handed a
// pointer into the kernel parameters without the compiler copying those to local memory.
struct StridedLayout {
  int64_t sizes[kMaxLayoutDims];
  int64_t strides[kMaxLayoutDims];
  int32_t ndim;
};

// The block's copy of the layout of the strided chunk it is at. At namespace scope, so that the
// per-chunk functions address it as shared memory rather than through a generic pointer.
namespace {
__shared__ StridedLayout chunk_layout;
}  // namespace

// Where a chunk's elements lie: elements [begin, begin + len) of the walk of the tensor at base.
template <typename T>
struct ChunkView {
  T* base;
  int64_t begin;
  int32_t len;
  int32_t head;  // flat: elements of the chunk before its first 16-byte boundary
  bool strided;  // false: flat; true: laid out as chunk_layout says

  __device__ __forceinline__ int64_t offset(int64_t e) const {
    return strided ? element_offset(chunk_layout.sizes, chunk_layout.strides, chunk_layout.ndim, e)
                   : e;
  }
};

// The block's view of chunk `ref` of a table; for a strided tensor its layout is copied into
// chunk_layout first. Every thread of the block must call it.
template <typename T, class Table>
__device__ __forceinline__ ChunkView<T> chunk_view(const Table& table, const ChunkRef& ref) {
  const int nd = table.ndim[ref.tensor];
  const ChunkView<T> view{reinterpret_cast<T*>(table.address[ref.tensor]), ref.begin, ref.len,
                          table.head[ref.tensor], nd != 0};
  if (nd == 0) return view;
  const int at = table.dims_at[ref.tensor];
  const int tid = threadIdx.x;
  __syncthreads();  // the previous chunk's walks are done with chunk_layout
  if (tid < nd) {
    chunk_layout.sizes[tid] = table.dims[at + tid];
    chunk_layout.strides[tid] = table.dims[at + nd + tid];
  }
  if (tid == 0) chunk_layout.ndim = nd;
  __syncthreads();
  return view;
}

// Visits the len elements of a flat run at p whose first `head` elements precede a 16-byte
// boundary (planner.h: vector_head): those and the tail one per thread, the packs between
// kLoadsInFlight per thread per step. The visitor sees visit.element(T&, slot) and
// visit.pack(Pack<T>&, slot), slot < kLoadsInFlight telling independent accumulators apart; with
// kWrite the packs it changed are stored back (elements are written through the reference).
template <bool kWrite, typename T, typename Visit>
__device__ __forceinline__ void walk_flat(T* p, int32_t len, int32_t head, Visit& visit) {
  const FlatSplit split = split_flat(len, head, kPerPack<T>);
  const int tid = threadIdx.x;
  if (tid < split.head) visit.element(p[tid], 0);
  if (tid < split.tail) visit.element(p[split.head + split.packs * kPerPack<T> + tid], 0);
  Pack<T>* packs = reinterpret_cast<Pack<T>*>(p + split.head);
  constexpr int kStep = kLoadsInFlight * kThreads;
  const int32_t full = split.packs - split.packs % kStep;
  // Not unrolled further: kLoadsInFlight already sets the loads per step, and more would only
  // raise register pressure.
#pragma unroll 1
  for (int32_t i = tid; i < full; i += kStep) {
    Pack<T> v[kLoadsInFlight];
#pragma unroll
    for (int k = 0; k < kLoadsInFlight; ++k) v[k] = packs[i + k * kThreads];
#pragma unroll
    for (int k = 0; k < kLoadsInFlight; ++k) {
      visit.pack(v[k], k);
      if constexpr (kWrite) packs[i + k * kThreads] = v[k];
    }
  }
  // The last, partial step, a pack at a time (guarded loads kept in flight together would cost
  // registers that the full steps do not need).
  for (int32_t i = full + tid; i < split.packs; i += kThreads) {
    Pack<T> v = packs[i];
    visit.pack(v, 0);
    if constexpr (kWrite) packs[i] = v;
  }
}

// Visits elements [begin, begin + len) (walk order) of a strided tensor: each warp takes a
// contiguous part of them with its lanes interleaved, so that a row's loads coalesce, and only a
// change of row costs the divisions of row_offset.
template <typename T, typename Visit>
__device__ __forceinline__ void walk_strided(T* base, const StridedLayout& layout, int64_t begin,
                                             int32_t len, Visit& visit) {
  const int nd = layout.ndim;
  const int64_t row_size = layout.sizes[nd - 1];
  const int64_t row_stride = layout.strides[nd - 1];
  const int32_t per_warp = (len + kWarps - 1) / kWarps;
  const int warp = threadIdx.x / kWarpSize;
  const int32_t stop = min(len, (warp + 1) * per_warp);
  int32_t i = warp * per_warp + static_cast<int32_t>(threadIdx.x % kWarpSize);
  if (i >= stop) return;
  int64_t row = (begin + i) / row_size;
  int64_t col = (begin + i) % row_size;
  int64_t row_start = row_offset(layout.sizes, layout.strides, nd, row);
#pragma unroll 1
  for (; i < stop; i += kWarpSize) {
    visit.element(base[row_start + col * row_stride], 0);
    col += kWarpSize;
    if (col >= row_size) {
      row += col / row_size;
      col %= row_size;
      row_start = row_offset(layout.sizes, layout.strides, nd, row);
    }
  }
}

// Tells the compiler that a chunk's data is global memory, for the per-chunk functions that
// receive its pointer as a (generic) argument: global loads are cheaper than generic ones.
template <typename T>
__device__ __forceinline__ void assume_spaces(const ChunkView<T>& view) {
  __builtin_assume(__isGlobal(view.base));
}

// Visits a chunk, flat or strided.
template <bool kWrite, typename T, typename Visit>
__device__ __forceinline__ void walk_chunk(const ChunkView<T>& view, Visit& visit) {
  assume_spaces(view);
  if (view.strided) {
    walk_strided(view.base, chunk_layout, view.begin, view.len, visit);
  } else {
    walk_flat<kWrite>(view.base + view.begin, view.len, view.head, visit);
  }
}

__device__ __forceinline__ double shfl_down(double v, int offset) {
  return __shfl_down_sync(kFullMask, v, offset);
}

__device__ __forceinline__ Partial shfl_down(const Partial& p, int offset) {
  Partial r;
  r.sum = __shfl_down_sync(kFullMask, p.sum, offset);
  r.nan = __shfl_down_sync(kFullMask, static_cast<long long>(p.nan), offset);
  r.inf = __shfl_down_sync(kFullMask, static_cast<long long>(p.inf), offset);
  r.scale = __shfl_down_sync(kFullMask, p.scale, offset);
  return r;
}

// Lane 0 gets merge over the warp's values, in a fixed tree order.
template <typename V, typename Merge>
__device__ __forceinline__ V warp_reduce(V v, Merge merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset));
  return v;
}

// Every thread gets merge over the block's values, in a fixed order (a warp tree, then the warps
// in order): the same inputs give bitwise the same result. `scratch` holds kWarps values.
template <typename V, typename Merge>
__device__ __forceinline__ V block_allreduce(V v, Merge merge, V* scratch) {
  __builtin_assume(__isShared(scratch));
  v = warp_reduce(v, merge);
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  V r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = merge(r, scratch[w]);
  return r;
}

}  // namespace gradstats::gpu
