// Unit tests of the CUDA kernels' host-side planner (csrc/cuda/planner.h), which is plain C++ and
// so runs without a GPU. Built and run by tests/test_planner.py; prints one line per failed check
// and ends with "N passed, N failed".
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/planner.h"

using namespace gradstats;
using namespace gradstats::gpu;

namespace {

template <typename A, typename B>
void check_eq(const A& actual, const B& expected, const std::string& what) {
  check(actual == static_cast<A>(expected),
        what + ": got " + std::to_string(static_cast<long long>(actual)) + ", expected " +
            std::to_string(static_cast<long long>(expected)));
}

bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

// A well-aligned address for tensor i (as the caching allocator gives), plus a byte offset.
uint64_t address_of(int i, uint64_t offset = 0) {
  constexpr uint64_t kBase = uint64_t{1} << 40;
  constexpr uint64_t kSpacing = uint64_t{1} << 36;
  return kBase + kSpacing * static_cast<uint64_t>(i) + offset;
}

TensorDesc strided_desc(std::vector<int64_t> sizes, std::vector<int64_t> strides, DType dtype,
                        uint64_t address) {
  TensorDesc d{address, dtype, Layout{}};
  if (!make_layout(sizes.data(), strides.data(), static_cast<int>(sizes.size()), d.layout)) {
    throw std::logic_error("test layout does not fit");
  }
  return d;
}

TensorDesc flat_desc(int64_t numel, DType dtype = DType::kFloat32,
                     uint64_t address = address_of(0)) {
  return strided_desc({numel}, {1}, dtype, address);
}

// What a chunk covers, by the call's tensor index.
struct Covered {
  int64_t tensor;
  int64_t begin;
  int64_t len;
  bool operator==(const Covered& o) const {
    return tensor == o.tensor && begin == o.begin && len == o.len;
  }
};

// The call's chunk list as the kernels see it: every launch packed, every chunk located.
template <class Table>
std::vector<Covered> chunks_seen(const std::vector<TensorDesc>& tensors, const CallPlan& plan) {
  std::vector<Covered> out;
  auto table = std::make_unique<Table>();
  for (const LaunchPlan& launch : plan.launches) {
    pack_launch(tensors, launch, *table);
    for (int32_t c = 0; c < table->num_chunks; ++c) {
      const ChunkRef ref = locate_chunk(*table, c);
      check_eq(static_cast<int64_t>(out.size()), table->first_chunk + c, "chunk slots are dense");
      out.push_back(Covered{table->first_tensor + ref.tensor, ref.begin, ref.len});
    }
  }
  return out;
}

// The chunk list by definition: each tensor cut into kChunkElems pieces, in list order.
std::vector<Covered> chunks_expected(const std::vector<TensorDesc>& tensors) {
  std::vector<Covered> out;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].layout.numel;
    for (int64_t b = 0; b < n; b += kChunkElems) {
      out.push_back(Covered{static_cast<int64_t>(t), b, std::min(kChunkElems, n - b)});
    }
  }
  return out;
}

void test_chunk_count() {
  check_eq(chunk_count(0), 0, "chunk_count(0)");
  check_eq(chunk_count(1), 1, "chunk_count(1)");
  check_eq(chunk_count(kChunkElems - 1), 1, "chunk_count(chunk - 1)");
  check_eq(chunk_count(kChunkElems), 1, "chunk_count(chunk)");
  check_eq(chunk_count(kChunkElems + 1), 2, "chunk_count(chunk + 1)");
  check_eq(chunk_count((int64_t{1} << 31) + 5), (int64_t{1} << 15) + 1, "chunk_count(2^31 + 5)");
}

void test_vector_head_and_split() {
  check_eq(vector_head(address_of(0), 2), 0, "aligned: no head");
  check_eq(vector_head(address_of(0, 2), 2), 7, "bf16 at +2 bytes: 7 elements to the boundary");
  check_eq(vector_head(address_of(0, 14), 2), 1, "bf16 at +14 bytes: 1 element");
  check_eq(vector_head(address_of(0, 4), 4), 3, "float at +4 bytes: 3 elements");
  check_eq(vector_head(address_of(0, 12), 4), 1, "float at +12 bytes: 1 element");
  check_eq(vector_head(address_of(0, 8), 8), 1, "double at +8 bytes: 1 element");

  for (int per_pack : {2, 4, 8}) {
    for (int head = 0; head < per_pack; ++head) {
      for (int len : {0, 1, head, head + 1, per_pack - 1, per_pack, 2 * per_pack + 3, 1000}) {
        const FlatSplit s = split_flat(len, head, per_pack);
        const std::string what = "split_flat(" + std::to_string(len) + ", " + std::to_string(head) +
                                 ", " + std::to_string(per_pack) + ")";
        check(s.head >= 0 && s.packs >= 0 && s.tail >= 0, what + " is non-negative");
        check_eq(s.head + s.packs * per_pack + s.tail, len, what + " covers every element once");
        check(s.tail < per_pack, what + " leaves less than a pack");
        check(s.head == std::min(head, len), what + " head");
      }
    }
  }
}

// Every chunk of a misaligned flat tensor starts its packs on a 16-byte boundary.
void test_misaligned_chunks_align_packs() {
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const int item = itemsize(dtype);
    for (int misalign = 0; misalign < kVectorBytes; misalign += item) {
      const uint64_t address = address_of(3, static_cast<uint64_t>(misalign));
      const std::vector<TensorDesc> tensors = {flat_desc(3 * kChunkElems + 11, dtype, address)};
      const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
      auto table = std::make_unique<SmallTable>();
      pack_launch(tensors, plan.launches[0], *table);
      for (int32_t c = 0; c < table->num_chunks; ++c) {
        const ChunkRef ref = locate_chunk(*table, c);
        const FlatSplit s = split_flat(ref.len, table->head[0], kVectorBytes / item);
        const uint64_t first_pack = address + static_cast<uint64_t>(ref.begin + s.head) * item;
        check(s.packs == 0 || first_pack % kVectorBytes == 0,
              "packs of chunk " + std::to_string(c) + " start aligned (misalignment " +
                  std::to_string(misalign) + ", itemsize " + std::to_string(item) + ")");
      }
    }
  }
}

// A table rebound to new addresses (a plan kept between calls, the gradients now elsewhere) is
// the table packed for those addresses: the same addresses and heads, the rest untouched.
void test_rebind_is_a_fresh_pack() {
  std::vector<TensorDesc> before;
  std::vector<TensorDesc> after;
  std::vector<uint64_t> addresses;
  const std::vector<DType> dtypes = {DType::kFloat64, DType::kFloat32, DType::kFloat16,
                                     DType::kBFloat16};
  for (int i = 0; i < 12; ++i) {
    const DType dtype = dtypes[i % dtypes.size()];
    const uint64_t moved = address_of(i + 20, static_cast<uint64_t>(itemsize(dtype) * (i % 4)));
    before.push_back(i % 3 == 2 ? strided_desc({4, 5}, {10, 1}, dtype, address_of(i))
                                : flat_desc(kChunkElems + i, dtype, address_of(i)));
    after.push_back(before.back());
    after.back().address = moved;
    addresses.push_back(moved);
  }
  const CallPlan plan = plan_call(before, kSmallTensors, kSmallDims);
  auto rebound = std::make_unique<SmallTable>();
  auto fresh = std::make_unique<SmallTable>();
  pack_launch(before, plan.launches[0], *rebound);
  rebind_launch(addresses, *rebound);
  pack_launch(after, plan.launches[0], *fresh);
  check(std::memcmp(rebound.get(), fresh.get(), sizeof(SmallTable)) == 0,
        "a rebound table equals the table packed at the new addresses");
  check(rebound->head[1] != 0 || rebound->head[3] != 0, "the new addresses are misaligned");
}

void test_empty_lists_and_tensors() {
  const CallPlan none = plan_call({}, kSmallTensors, kSmallDims);
  check_eq(none.launches.size(), 1, "an empty list still has the launch that writes totals");
  check_eq(none.num_chunks, 0, "an empty list has no chunks");

  const std::vector<TensorDesc> tensors = {flat_desc(0), flat_desc(5), flat_desc(0),
                                           flat_desc(kChunkElems + 1), flat_desc(0)};
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  check_eq(plan.launches.size(), 1, "empty tensors share a launch");
  check_eq(plan.num_chunks, 3, "empty tensors have no chunks");
  check(chunks_seen<SmallTable>(tensors, plan) == chunks_expected(tensors),
        "chunks skip the empty tensors, first and last included");

  const std::vector<TensorDesc> all_empty = {flat_desc(0), flat_desc(0)};
  const CallPlan empty_plan = plan_call(all_empty, kSmallTensors, kSmallDims);
  check_eq(empty_plan.num_chunks, 0, "a list of empty tensors has no chunks");
  check_eq(empty_plan.launches.size(), 1, "and one launch");
  check_eq(empty_plan.launches[0].num_tensors, 2, "that holds both tensors (their norms are 0)");
}

void test_chunk_boundaries() {
  const std::vector<TensorDesc> tensors = {
      flat_desc(1),
      flat_desc(kChunkElems - 1),
      flat_desc(kChunkElems),
      flat_desc(kChunkElems + 1),
      flat_desc(3 * kChunkElems + 7, DType::kBFloat16, address_of(4, 6)),
  };
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  check_eq(plan.num_chunks, 1 + 1 + 1 + 2 + 4, "chunks of boundary sizes");
  const std::vector<Covered> seen = chunks_seen<SmallTable>(tensors, plan);
  check(seen == chunks_expected(tensors), "boundary sizes are cut at multiples of the chunk");
  check_eq(seen.back().len, 7, "the last chunk holds the remainder");
}

void test_huge_tensor() {
  // More than 2^31 elements: chunk offsets need int64, the chunk count fits an int32.
  const int64_t numel = (int64_t{1} << 31) + 5;
  const std::vector<TensorDesc> tensors = {flat_desc(3), flat_desc(numel, DType::kBFloat16),
                                           flat_desc(2)};
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  auto table = std::make_unique<SmallTable>();
  pack_launch(tensors, plan.launches[0], *table);
  check_eq(table->numel[1], numel, "numel kept in int64");
  const int32_t last_of_huge = table->chunk_end[1] - 1;
  const ChunkRef ref = locate_chunk(*table, last_of_huge);
  check_eq(ref.tensor, 1, "the last chunk of the huge tensor is found");
  check_eq(ref.begin, numel - 5, "and begins past 2^31");
  check_eq(ref.len, 5, "and holds the 5 elements past 2^31");
  const ChunkRef after = locate_chunk(*table, last_of_huge + 1);
  check(after.tensor == 2 && after.begin == 0 && after.len == 2, "the next tensor follows");

  const int64_t too_big = kMaxLaunchChunks * kChunkElems + 1;
  check(throws([&] { plan_call({flat_desc(too_big)}, kSmallTensors, kSmallDims); }),
        "a tensor of more chunks than a launch may hold is refused");
}

// Lists longer than one launch: split by the tensor capacity, chunks identical to one launch.
void test_launch_split_by_capacity() {
  using Tiny = TensorTable<4, 2 * kMaxLayoutDims>;
  std::vector<TensorDesc> tensors;
  const DType dtypes[] = {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (int i = 0; i < 11; ++i) {
    const DType dtype = dtypes[i % 4];
    tensors.push_back(flat_desc(i % 3 == 0 ? 0 : (i * kChunkElems) / 2 + i, dtype,
                                address_of(i, static_cast<uint64_t>(itemsize(dtype) * (i % 2)))));
  }
  const CallPlan plan = plan_call(tensors, Tiny::kCapacity, Tiny::kDimCapacity);
  check_eq(plan.launches.size(), 3, "11 tensors, 4 per launch: 3 launches");
  check_eq(plan.launches[0].num_tensors, 4, "first launch full");
  check_eq(plan.launches[2].num_tensors, 3, "last launch holds the rest");
  int64_t next_chunk = 0;
  int32_t next_tensor = 0;
  for (const LaunchPlan& l : plan.launches) {
    check_eq(l.first_tensor, next_tensor, "launches cover the list in order");
    check_eq(l.first_chunk, next_chunk, "launches' chunks are consecutive");
    next_tensor += l.num_tensors;
    next_chunk += l.num_chunks;
  }
  check_eq(next_tensor, 11, "every tensor in a launch");
  check_eq(next_chunk, plan.num_chunks, "every chunk in a launch");

  const CallPlan single = plan_call(tensors, kSmallTensors, kSmallDims);
  check_eq(single.launches.size(), 1, "the same list fits one small launch");
  check(chunks_seen<Tiny>(tensors, plan) == chunks_seen<SmallTable>(tensors, single),
        "split launches see the very chunks of one launch, in the same workspace slots");
  check(chunks_seen<Tiny>(tensors, plan) == chunks_expected(tensors), "and the right ones");

  // Mixed dtypes in one launch: each tensor keeps its tag and its own head.
  auto table = std::make_unique<SmallTable>();
  pack_launch(tensors, single.launches[0], *table);
  for (int i = 0; i < 11; ++i) {
    check_eq(table->dtype[i], static_cast<int>(dtypes[i % 4]),
             "dtype tag of tensor " + std::to_string(i));
    check_eq(table->head[i], vector_head(tensors[i].address, itemsize(tensors[i].dtype)),
             "head of tensor " + std::to_string(i));
    check_eq(table->address[i], tensors[i].address, "address of tensor " + std::to_string(i));
  }
}

void test_ten_thousand_tensors() {
  std::vector<TensorDesc> tensors;
  for (int i = 0; i < 10000; ++i) tensors.push_back(flat_desc(1 + (i * 7919) % 3000));
  const CallPlan small = plan_call(tensors, kSmallTensors, kSmallDims);
  check(small.launches.size() > 1, "10,000 tensors do not fit one small launch");
  const CallPlan large = plan_call(tensors, kLargeTensors, kLargeDims);
  check_eq(large.launches.size(), (10000 + kLargeTensors - 1) / kLargeTensors,
           "10,000 tensors take ceil(n / capacity) large launches");
  check(chunks_seen<LargeTable>(tensors, large) == chunks_expected(tensors),
        "10,000 tensors: every chunk once, in order");
}

void test_strided() {
  // A column slice of a [6, 10] float matrix, a permuted-dense tensor, a sliced 3-d tensor.
  const std::vector<TensorDesc> tensors = {
      strided_desc({6, 4}, {10, 1}, DType::kFloat32, address_of(0)),
      strided_desc({4, 3, 2}, {1, 8, 4}, DType::kFloat16, address_of(1)),
      strided_desc({3, 4, 5}, {60, 10, 2}, DType::kFloat64, address_of(2)),
      strided_desc({5, 1, 7}, {7, 99, 1}, DType::kBFloat16, address_of(3, 2)),
  };
  check(!is_flat(tensors[0].layout), "a column slice is strided");
  check(is_flat(tensors[1].layout), "a permuted-dense tensor is flat");
  check(!is_flat(tensors[2].layout), "a sliced 3-d tensor is strided");
  check(is_flat(tensors[3].layout), "size-1 dims are ignored");
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  auto table = std::make_unique<SmallTable>();
  pack_launch(tensors, plan.launches[0], *table);
  check_eq(table->ndim[1], 0, "flat tensors take no dims");
  check_eq(table->head[3], 7, "a misaligned flat bf16 tensor has a head");
  check_eq(table->head[0], 0, "strided tensors have no head");
  for (int t : {0, 2}) {
    const Layout& layout = tensors[t].layout;
    const int nd = table->ndim[t];
    check_eq(nd, layout.ndim, "strided tensor keeps its merged dims");
    const int64_t* sizes = table->dims + table->dims_at[t];
    const int64_t* strides = sizes + nd;
    int64_t e = 0;
    bool ok = true;
    for_each_row(layout, 0, layout.numel, [&](int64_t off, int64_t n, int64_t stride) {
      for (int64_t i = 0; i < n; ++i, ++e) {
        ok = ok && element_offset(sizes, strides, nd, e) == off + i * stride;
        if (i == 0) ok = ok && row_offset(sizes, strides, nd, e / sizes[nd - 1]) == off;
      }
    });
    check(ok && e == layout.numel,
          "element_offset walks tensor " + std::to_string(t) + " as layout.h does");
  }
}

void test_launch_split_by_dims() {
  std::vector<TensorDesc> tensors;
  for (int i = 0; i < 40; ++i) {
    tensors.push_back(strided_desc({3, 4, 5}, {60, 10, 2}, DType::kFloat32, address_of(i)));
  }
  const int dims_each = 2 * tensors[0].layout.ndim;
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  check_eq(plan.launches[0].num_tensors, kSmallDims / dims_each,
           "strided tensors are split by the dims pool");
  for (const LaunchPlan& l : plan.launches) check(l.dims <= kSmallDims, "dims pool respected");
  check(chunks_seen<SmallTable>(tensors, plan) == chunks_expected(tensors),
        "split by dims: every chunk once");

  // A 16-dim layout that nothing merges still fits an empty table.
  std::vector<int64_t> sizes(kMaxLayoutDims, 2);
  std::vector<int64_t> strides(kMaxLayoutDims);
  for (int d = 0; d < kMaxLayoutDims; ++d)
    strides[d] = int64_t{3} << (2 * (kMaxLayoutDims - 1 - d));
  const std::vector<TensorDesc> deep = {
      strided_desc(sizes, strides, DType::kFloat32, address_of(0)),
      strided_desc(sizes, strides, DType::kFloat32, address_of(1))};
  const CallPlan deep_plan = plan_call(deep, kSmallTensors, kSmallDims);
  check_eq(deep_plan.launches.size(), 1, "two 16-dim layouts fill the small pool exactly");
  check(chunks_seen<SmallTable>(deep, deep_plan) == chunks_expected(deep), "16-dim chunks");
}

void test_pack_errors() {
  using Tiny = TensorTable<2, 2 * kMaxLayoutDims>;
  const std::vector<TensorDesc> tensors = {flat_desc(1), flat_desc(2), flat_desc(3)};
  const CallPlan plan = plan_call(tensors, kSmallTensors, kSmallDims);
  auto table = std::make_unique<Tiny>();
  check(throws([&] { pack_launch(tensors, plan.launches[0], *table); }),
        "a launch larger than the table is refused");
  LaunchPlan wrong = plan.launches[0];
  wrong.num_chunks += 1;
  auto small = std::make_unique<SmallTable>();
  check(throws([&] { pack_launch(tensors, wrong, *small); }), "a chunk count that disagrees");
  wrong = plan.launches[0];
  wrong.first_tensor = 2;
  check(throws([&] { pack_launch(tensors, wrong, *small); }), "tensors past the list's end");
  check(throws([&] { plan_call(tensors, 0, kSmallDims); }), "a capacity of 0");
}

void test_table_sizes() {
  check(sizeof(LargeTable) + kArgsParamBytes <= static_cast<size_t>(kMaxParamBytes),
        "a large table fits the kernel parameter limit");
  check(kLargeTensors >= 1000, "a large table holds 1000+ tensors");
  check(sizeof(SmallTable) <= 4096, "a small table is about as large as torch's foreach metadata");
}

}  // namespace

int main() {
  test_chunk_count();
  test_vector_head_and_split();
  test_misaligned_chunks_align_packs();
  test_rebind_is_a_fresh_pack();
  test_empty_lists_and_tensors();
  test_chunk_boundaries();
  test_huge_tensor();
  test_launch_split_by_capacity();
  test_ten_thousand_tensors();
  test_strided();
  test_launch_split_by_dims();
  test_pack_errors();
  test_table_sizes();
  return report();
}
