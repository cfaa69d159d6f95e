// Host-side planner of the CUDA kernels: cuts the tensors of a call into chunks, splits the list
// into launches whose metadata fits the kernel parameters, and packs each launch's tensor table.
// Plain C++ (no CUDA, no torch), so it is unit-tested on machines without a GPU
// (tests/cpp/test_planner.cpp); the GS_HD helpers are the very code the kernels run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "layout.h"
#include "partial.h"

namespace gradstats::gpu {

// Width of one vectorised load or store: the widest single global memory access.
constexpr int kVectorBytes = 16;

// Kernel parameters may take this many bytes in all (CUDA >= 12.1 on Volta and newer; the
// toolkits and drivers torch's CUDA builds need are newer still).
constexpr int kMaxParamBytes = 32764;
// What the kernels' other parameters (StatsArgs, ScaleArgs) may take next to a tensor table.
constexpr int kArgsParamBytes = 256;

// Chunks per launch are kept below this, so that a chunk index plus the grid size fits an int32.
constexpr int64_t kMaxLaunchChunks = int64_t{1} << 30;

// What the planner needs to know about a tensor (already validated by checks.h).
struct TensorDesc {
  uint64_t address;  // of its first element (walk order starts there, layout.h)
  DType dtype;
  Layout layout;
};

// A tensor is flat when its walk (layout.h) is one row of stride 1: contiguous or permuted-dense.
inline bool is_flat(const Layout& layout) { return layout.is_flat(); }

// Dims a tensor takes in a table's dims pool: none when flat, else the merged layout's.
inline int table_dims(const Layout& layout) { return is_flat(layout) ? 0 : layout.ndim; }

inline int64_t chunk_count(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// Elements before the first 16-byte boundary at or after address (torch data pointers are
// aligned to their element size, which divides 16).
GS_HD int vector_head(uint64_t address, int itemsize) {
  const auto misalignment = static_cast<int>(address % kVectorBytes);
  return misalignment == 0 ? 0 : (kVectorBytes - misalignment) / itemsize;
}

// A launch covers whole tensors [first_tensor, first_tensor + num_tensors) of the call, and their
// chunks [first_chunk, first_chunk + num_chunks) of the call's chunk list.
struct LaunchPlan {
  int32_t first_tensor = 0;
  int32_t num_tensors = 0;
  int64_t first_chunk = 0;
  int64_t num_chunks = 0;
  int32_t dims = 0;  // of the table's dims pool in use
};

struct CallPlan {
  std::vector<LaunchPlan> launches;
  int64_t num_chunks = 0;  // of all launches: the size of the chunk workspace
};

// Splits a call into launches of at most `capacity` tensors and `dim_capacity` pool entries (two
// per dim of each strided tensor), in list order. A call always has at least one launch (its last
// block writes the totals), even when every tensor is empty. Throws std::invalid_argument when a
// tensor cannot fit any launch.
CallPlan plan_call(const std::vector<TensorDesc>& tensors, int capacity, int dim_capacity);

// The metadata of one launch, passed by value as a kernel parameter: it is copied into the launch
// (and into a CUDA graph node when captured), so nothing on the host is read at replay. Arrays are
// ordered by element size, so each is aligned without padding.
template <int kTensors, int kDims>
struct alignas(16) TensorTable {
  static constexpr int kCapacity = kTensors;
  static constexpr int kDimCapacity = kDims;

  int64_t first_chunk;   // the call's index of chunk 0 (its slot in the partials workspace)
  int32_t first_tensor;  // the call's index of tensor 0
  int32_t num_tensors;
  int32_t num_chunks;
  int32_t unused;  // explicit padding: the arrays start 8-byte aligned
  uint64_t address[kTensors];
  int64_t numel[kTensors];
  int64_t dims[kDims];  // strided tensors: their merged sizes, then their strides (in elements)
  int32_t chunk_end[kTensors];  // chunks of tensors 0..t together
  int16_t dims_at[kTensors];    // where tensor t's sizes start in dims
  uint8_t dtype[kTensors];      // DType
  uint8_t ndim[kTensors];       // 0: flat (one row of stride 1), else the merged layout's dims
  uint8_t head[kTensors];       // flat: elements before the first 16-byte boundary
};

// The two table sizes the kernels are built for. A launch copies its whole table, so lists of up to
// kSmallTensors tensors (most models' gradients) pass about 4 KB, as torch's foreach kernels do;
// longer lists take tables that fill the parameter limit, a few launches for 10,000 tensors.
constexpr int kSmallTensors = 128;
constexpr int kSmallDims = 64;  // two 16-dim strided layouts, or sixteen 2-dim ones
constexpr int kLargeDims = 256;
// Table bytes per tensor (address, numel, chunk_end, dims_at, dtype, ndim, head) and besides them.
constexpr int kTableBytesPerTensor = 8 + 8 + 4 + 2 + 1 + 1 + 1;
constexpr int kTableHeaderBytes = 32;  // the scalars before the arrays, and the final padding
// As many tensors as fit the parameter limit next to the other arguments, rounded down to a
// multiple of 16 so that every array ends 16-byte aligned.
constexpr int kLargeTensors = (kMaxParamBytes - kArgsParamBytes - kTableHeaderBytes -
                               kLargeDims * static_cast<int>(sizeof(int64_t))) /
                              kTableBytesPerTensor / 16 * 16;

using SmallTable = TensorTable<kSmallTensors, kSmallDims>;
using LargeTable = TensorTable<kLargeTensors, kLargeDims>;
static_assert(sizeof(LargeTable) + kArgsParamBytes <= kMaxParamBytes,
              "a large table and the other kernel arguments must fit the parameter limit");
static_assert(kSmallDims >= 2 * kMaxLayoutDims, "every layout must fit an empty table");

// Fills `table` with one launch of a plan. Throws std::invalid_argument if it does not fit.
template <class Table>
void pack_launch(const std::vector<TensorDesc>& tensors, const LaunchPlan& launch, Table& table);

// Where table tensor t's elements start: its address and, when flat, the elements before its
// first 16-byte boundary (which the vectorised loads start at).
template <class Table>
void set_address(Table& table, int32_t t, uint64_t address) {
  table.address[t] = address;
  const int item = itemsize(static_cast<DType>(table.dtype[t]));
  table.head[t] = table.ndim[t] == 0 ? static_cast<uint8_t>(vector_head(address, item)) : 0;
}

// Points a packed table at its tensors' current memory (addresses: of the call's tensors, in
// list order), the layouts unchanged: what a plan kept between calls does at each call.
template <class Table>
void rebind_launch(const std::vector<uint64_t>& addresses, Table& table) {
  for (int32_t t = 0; t < table.num_tensors; ++t) {
    set_address(table, t, addresses.at(static_cast<size_t>(table.first_tensor) + t));
  }
}

// The part of tensor `tensor` (table index) that chunk `begin / kChunkElems` covers.
struct ChunkRef {
  int32_t tensor;
  int64_t begin;  // first element, in walk order
  int32_t len;
};

// Which tensor holds chunk `chunk` (0 <= chunk < num_chunks) of a launch, and where: a binary
// search of chunk_end, which skips the empty tensors.
template <class Table>
GS_HD ChunkRef locate_chunk(const Table& table, int32_t chunk) {
  int32_t lo = 0;
  int32_t hi = table.num_tensors - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (table.chunk_end[mid] > chunk) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int32_t first = lo == 0 ? 0 : table.chunk_end[lo - 1];
  const int64_t begin = static_cast<int64_t>(chunk - first) * kChunkElems;
  const int64_t rest = table.numel[lo] - begin;
  return ChunkRef{lo, begin, static_cast<int32_t>(rest < kChunkElems ? rest : kChunkElems)};
}

// The chunks [first, end) of table tensor t.
template <class Table>
GS_HD int32_t tensor_first_chunk(const Table& table, int32_t t) {
  return t == 0 ? 0 : table.chunk_end[t - 1];
}

// How a flat run of len elements whose first `head` elements precede a 16-byte boundary splits
// into scalar head elements, whole packs of per_pack elements, and scalar tail elements.
struct FlatSplit {
  int32_t head;
  int32_t packs;
  int32_t tail;
};

GS_HD FlatSplit split_flat(int32_t len, int32_t head, int32_t per_pack) {
  const int32_t h = head < len ? head : len;
  const int32_t packs = (len - h) / per_pack;
  return FlatSplit{h, packs, len - h - packs * per_pack};
}

// Offset (in elements) of the first element of walk row `row` of a strided layout (nd merged dims,
// sizes and strides as in layout.h): rows are the innermost dim's runs, the outer dims index them.
GS_HD int64_t row_offset(const int64_t* sizes, const int64_t* strides, int nd, int64_t row) {
  int64_t offset = 0;
  for (int d = nd - 2; d >= 0; --d) {
    offset += (row % sizes[d]) * strides[d];
    row /= sizes[d];
  }
  return offset;
}

// Offset (in elements) of element e (walk order) of a strided layout.
GS_HD int64_t element_offset(const int64_t* sizes, const int64_t* strides, int nd, int64_t e) {
  const int64_t row_size = sizes[nd - 1];
  return row_offset(sizes, strides, nd, e / row_size) + (e % row_size) * strides[nd - 1];
}

// Throws std::invalid_argument saying why a launch does not fit a table (planner.cpp).
[[noreturn]] void throw_bad_launch(const LaunchPlan& launch, int capacity, int dim_capacity,
                                   const char* why);

// pack_launch is a template (one per table size): its definition stays in the header.
template <class Table>
void pack_launch(const std::vector<TensorDesc>& tensors, const LaunchPlan& launch, Table& table) {
  static_assert(Table::kDimCapacity <= INT16_MAX, "dims_at is an int16 index into dims");
  const auto fail = [&](const char* why) {
    throw_bad_launch(launch, Table::kCapacity, Table::kDimCapacity, why);
  };
  if (launch.first_tensor < 0 || launch.num_tensors < 0 ||
      static_cast<size_t>(launch.first_tensor) + launch.num_tensors > tensors.size()) {
    fail("its tensors are not in the list");
  }
  if (launch.num_tensors > Table::kCapacity) fail("it has more tensors than the table holds");
  if (launch.num_chunks > kMaxLaunchChunks) fail("it has more chunks than a launch may have");
  table = Table{};
  table.first_chunk = launch.first_chunk;
  table.first_tensor = launch.first_tensor;
  table.num_tensors = launch.num_tensors;
  table.num_chunks = static_cast<int32_t>(launch.num_chunks);
  int64_t chunks = 0;
  int dims = 0;
  for (int32_t t = 0; t < launch.num_tensors; ++t) {
    const TensorDesc& desc = tensors[launch.first_tensor + t];
    const Layout& layout = desc.layout;
    const int nd = table_dims(layout);
    if (dims + 2 * nd > Table::kDimCapacity) fail("its strided layouts overflow the dims pool");
    chunks += chunk_count(layout.numel);
    table.numel[t] = layout.numel;
    table.chunk_end[t] = static_cast<int32_t>(std::min(chunks, kMaxLaunchChunks));
    table.dims_at[t] = static_cast<int16_t>(dims);
    table.dtype[t] = static_cast<uint8_t>(desc.dtype);
    table.ndim[t] = static_cast<uint8_t>(nd);
    set_address(table, t, desc.address);
    std::copy(layout.sizes, layout.sizes + nd, table.dims + dims);
    std::copy(layout.strides, layout.strides + nd, table.dims + dims + nd);
    dims += 2 * nd;
  }
  if (chunks != launch.num_chunks) fail("its chunk count disagrees with its tensors'");
}

}  // namespace gradstats::gpu
