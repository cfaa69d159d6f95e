// The CUDA kernels' chunk walks (csrc/cuda/device.cuh), run on the host (host_cuda.h) with the
// threads of a block one after the other, which is all the walks need (their threads share
// nothing). Checks that every element of a chunk is visited exactly once and, for writing walks,
// written exactly once, for flat chunks of every element size with every misalignment, around
// the pack and step boundaries, and for strided layouts cut into chunks.
// Built and run by tests/test_planner.py (needs torch's and the CUDA toolkit's headers); ends
// with "N passed, N failed".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

// host_cuda.h stands in for CUDA: it must come before the device code.
// clang-format off
#include "host_cuda.h"
#include "cuda/device.cuh"
// clang-format on

#include "check.h"

using namespace gradstats;
using namespace gradstats::gpu;

namespace {

// Counts the visits of each element (elements hold their own index) and overwrites it.
template <typename T>
struct CountVisits {
  static constexpr float kVisited = -1.0f;
  std::vector<int>* visits;
  T* base;

  void element(T& x, int) {
    ++(*visits)[&x - base];
    x = T(kVisited);
  }
  void pack(Pack<T>& v, int slot) {
    check(slot >= 0 && slot < kLoadsInFlight, "pack slot within the loads in flight");
    for (int e = 0; e < kPerPack<T>; ++e) {
      ++(*visits)[static_cast<int64_t>(static_cast<float>(v.x[e]))];
      v.x[e] = T(kVisited);
    }
  }
};

// Largest index each element type holds exactly (the index is read back from the value).
template <typename T>
constexpr int kExactIndices = std::is_same_v<T, c10::BFloat16> ? 256
                              : std::is_same_v<T, c10::Half>   ? 2048
                                                               : 1 << 24;

template <typename T>
void flat_case(int offset, int len) {
  if (len > kExactIndices<T>) return;
  std::vector<T> storage(static_cast<size_t>(len) + 2 * kVectorBytes);
  const auto start = reinterpret_cast<uintptr_t>(storage.data());
  T* aligned = reinterpret_cast<T*>((start + kVectorBytes - 1) / kVectorBytes * kVectorBytes);
  T* p = aligned + offset;
  for (int i = 0; i < len; ++i) p[i] = T(static_cast<float>(i));
  std::vector<int> visits(len, 0);
  CountVisits<T> count{&visits, p};
  const int head = vector_head(reinterpret_cast<uint64_t>(p), sizeof(T));
  for (unsigned t = 0; t < kThreads; ++t) {
    threadIdx.x = t;
    walk_flat<true>(p, len, head, count);
  }
  bool once = std::all_of(visits.begin(), visits.end(), [](int c) { return c == 1; });
  for (int i = 0; i < len; ++i) once = once && static_cast<float>(p[i]) == CountVisits<T>::kVisited;
  check(once, "flat walk, itemsize " + std::to_string(sizeof(T)) + ", offset " +
                  std::to_string(offset) + ", len " + std::to_string(len) +
                  ": every element visited and written once");
}

struct RecordAddresses {
  std::map<const float*, int>* visits;
  void element(float& x, int) { ++(*visits)[&x]; }
  void pack(Pack<float>&, int) { check(false, "strided walks have no packs"); }
};

void strided_case(std::vector<int64_t> sizes, std::vector<int64_t> strides, int64_t chunk) {
  Layout layout;
  make_layout(sizes.data(), strides.data(), static_cast<int>(sizes.size()), layout);
  int64_t span = 1;
  for (size_t d = 0; d < sizes.size(); ++d) span += (sizes[d] - 1) * strides[d];
  std::vector<float> storage(span);
  chunk_layout.ndim = layout.ndim;
  std::copy(layout.sizes, layout.sizes + layout.ndim, chunk_layout.sizes);
  std::copy(layout.strides, layout.strides + layout.ndim, chunk_layout.strides);
  for (int64_t begin = 0; begin < layout.numel; begin += chunk) {
    const auto len = static_cast<int32_t>(std::min(chunk, layout.numel - begin));
    std::map<const float*, int> visits;
    RecordAddresses record{&visits};
    for (unsigned t = 0; t < kThreads; ++t) {
      threadIdx.x = t;
      walk_strided(storage.data(), chunk_layout, begin, len, record);
    }
    std::map<const float*, int> expected;
    for_each_row(layout, begin, begin + len, [&](int64_t off, int64_t n, int64_t stride) {
      for (int64_t i = 0; i < n; ++i) ++expected[storage.data() + off + i * stride];
    });
    const std::string what = "strided walk, " + std::to_string(layout.ndim) + " dims, chunk at " +
                             std::to_string(begin) + " of " + std::to_string(len);
    check(visits == expected, what + ": the chunk's elements, each once");
    const ChunkView<float> view{storage.data(), begin, len, 0, true};
    bool exact_ok = true;
    for (int64_t e = begin; e < begin + len; ++e) {
      exact_ok = exact_ok && expected.count(storage.data() + view.offset(e)) == 1;
    }
    check(exact_ok, what + ": the exact path's offsets");
  }
}

}  // namespace

int main() {
  const int lens[] = {0,    1,    2,    7,    8,    9,    31,   255,  256,
                      1023, 1024, 1025, 4095, 4096, 4097, 8193, 65536};
  for (int len : lens) {
    for (int offset = 0; offset < kVectorBytes / 2; ++offset) {
      flat_case<c10::Half>(offset, len);
      flat_case<c10::BFloat16>(offset, len);
    }
    for (int offset = 0; offset < kVectorBytes / 4; ++offset) flat_case<float>(offset, len);
    for (int offset = 0; offset < kVectorBytes / 8; ++offset) flat_case<double>(offset, len);
  }
  strided_case({6, 4}, {10, 1}, kChunkElems);
  strided_case({300, 47}, {70, 1}, 1000);
  strided_case({5, 10, 4}, {110, 11, 2}, 7);
  strided_case({9, 33}, {1, 18}, 100);  // a transpose with gaps
  strided_case({1000, 3}, {5, 1}, 64);  // rows shorter than a warp
  strided_case({3, 2, 2, 2, 2, 5}, {1000, 300, 100, 40, 13, 2}, 17);
  strided_case({5, 1000}, {0, 1}, 333);  // a broadcast dim
  return report();
}
