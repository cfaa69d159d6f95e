// How a kernel walks the elements of a (possibly non-contiguous) tensor: as rows of equally strided
// elements. Dimensions of size 1 are dropped, the rest ordered by decreasing stride and merged
// where memory allows, so a contiguous or permuted-dense tensor becomes a single row of stride 1
// and a sliced one becomes a few long rows. Plain C++, no torch dependency.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gradstats {

constexpr int kMaxLayoutDims = 16;

// Elements per chunk, on every device: the kernels cut each tensor into chunks of this many
// elements (the last one shorter) and reduce every chunk to one Partial (partial.h). 2^16 elements
// (128-512 KiB) amortise the per-chunk work, yet a model's gradients still give thousands of chunks
// to balance over CPU threads or a persistent GPU grid. A multiple of every vector width, so all
// chunks of a tensor share its 16-byte alignment. The devices need not agree (each is
// deterministic on its own), but one size keeps their tests and planners alike.
constexpr int64_t kChunkElems = int64_t{1} << 16;

struct Layout {
  int ndim = 0;  // after merging; 0 for a single element
  int64_t numel = 1;
  int64_t sizes[kMaxLayoutDims] = {};
  int64_t strides[kMaxLayoutDims] = {};  // in elements

  int64_t row_stride() const { return ndim == 0 ? 1 : strides[ndim - 1]; }
  bool is_flat() const { return ndim <= 1 && row_stride() == 1; }
};

// Returns false when the tensor has more than kMaxLayoutDims dimensions that cannot be merged.
inline bool make_layout(const int64_t* sizes, const int64_t* strides, int ndim, Layout& out) {
  out = Layout{};
  int order[64];
  int kept = 0;
  for (int d = 0; d < ndim; ++d) {
    out.numel *= sizes[d];
    if (sizes[d] != 1 && kept < 64) order[kept++] = d;
  }
  if (out.numel == 0) {
    out.ndim = 1;
    out.sizes[0] = 0;
    out.strides[0] = 1;
    return true;
  }
  // Outermost first: decreasing stride, then decreasing size (stride-0 dims go innermost).
  std::stable_sort(order, order + kept, [&](int a, int b) {
    return strides[a] != strides[b] ? strides[a] > strides[b] : sizes[a] > sizes[b];
  });
  for (int k = 0; k < kept; ++k) {
    const int d = order[k];
    if (out.ndim > 0 && out.strides[out.ndim - 1] == strides[d] * sizes[d]) {
      out.sizes[out.ndim - 1] *= sizes[d];  // the previous dim steps exactly over this one: merge
      out.strides[out.ndim - 1] = strides[d];
      continue;
    }
    if (out.ndim == kMaxLayoutDims) return false;
    out.sizes[out.ndim] = sizes[d];
    out.strides[out.ndim] = strides[d];
    ++out.ndim;
  }
  return true;
}

// Calls f(offset, length, stride) for the rows holding elements [begin, end) of the walk order, a
// row at a time; offsets and strides are in elements from the tensor's first element.
template <typename F>
void for_each_row(const Layout& layout, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  if (layout.ndim <= 1) {
    f(begin * layout.row_stride(), end - begin, layout.row_stride());
    return;
  }
  const int inner = layout.ndim - 1;
  int64_t index[kMaxLayoutDims];
  int64_t rest = begin;
  for (int d = inner; d >= 0; --d) {
    index[d] = rest % layout.sizes[d];
    rest /= layout.sizes[d];
  }
  int64_t pos = begin;
  while (pos < end) {
    int64_t offset = 0;
    for (int d = 0; d <= inner; ++d) offset += index[d] * layout.strides[d];
    const int64_t len = std::min(layout.sizes[inner] - index[inner], end - pos);
    f(offset, len, layout.strides[inner]);
    pos += len;
    index[inner] = 0;
    for (int d = inner - 1; d >= 0; --d) {
      if (++index[d] < layout.sizes[d]) break;
      index[d] = 0;
    }
  }
}

}  // namespace gradstats
