// The CUDA kernels themselves (csrc/cuda/kernels.cuh), run on the host (host_cuda.h: a block's
// threads are fibers, the blocks run one after another, in index order or shuffled), fed by the
// real planner. Checks, against partial.h's exact_partial over each tensor in walk order: counts
// exactly, norms, total and clip coefficient within 1e-6, for every dtype, misaligned and strided
// tensors, empty ones, NaN/Inf chunks (the exact path), overflowing squares, tiny values (the
// double re-run), every norm kind and policy; the finish spread over the grid (many one-chunk
// tensors, tensors whose chunks a warp or the whole block combines, several launches, the
// counters); that the outputs are bitwise the same for any grid size, block order, split into
// launches, and call over a reused workspace; and that the scale kernel scales in opmath, zeroes
// what it is told to, and touches nothing when the coefficient is >= 1. Built and run by
// tests/test_planner.py; ends with "N passed, N failed". This checks the kernels' logic, not the
// GPU's behaviour.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

// host_cuda.h stands in for CUDA: it must come before the device code.
// clang-format off
#include "host_cuda.h"
#include "cuda/kernels.cuh"
#include "cuda/planner.h"
// clang-format on

#include "check.h"

using namespace gradstats;
using namespace gradstats::gpu;

namespace {

// Relative tolerance of the kernels' norms against exact_partial in double: their float lanes
// sum at most 8 terms before adding them in double (kernels.cuh).
constexpr double kNormRtol = 1e-6;

bool close(double actual, double expected, double rtol = kNormRtol) {
  if (std::isnan(expected)) return std::isnan(actual);
  if (std::isinf(expected)) return actual == expected;
  return std::fabs(actual - expected) <= rtol * std::fabs(expected);
}

double load_as_double(const unsigned char* p, DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return *reinterpret_cast<const double*>(p);
    case DType::kFloat32:
      return *reinterpret_cast<const float*>(p);
    case DType::kFloat16:
      return static_cast<float>(*reinterpret_cast<const c10::Half*>(p));
    default:
      return static_cast<float>(*reinterpret_cast<const c10::BFloat16*>(p));
  }
}

void store_from_double(unsigned char* p, DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat64:
      *reinterpret_cast<double*>(p) = v;
      break;
    case DType::kFloat32:
      *reinterpret_cast<float*>(p) = static_cast<float>(v);
      break;
    case DType::kFloat16:
      *reinterpret_cast<c10::Half*>(p) = c10::Half(static_cast<float>(v));
      break;
    default:
      *reinterpret_cast<c10::BFloat16*>(p) = c10::BFloat16(static_cast<float>(v));
      break;
  }
}

// A tensor in host memory: a 16-byte aligned buffer, the tensor at an element offset into it.
struct HostTensor {
  DType dtype;
  int64_t offset;  // elements from the aligned start: misaligns the packs
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  std::vector<unsigned char> buffer;
  Layout layout;

  unsigned char* data() {
    const auto start = reinterpret_cast<uintptr_t>(buffer.data());
    const uintptr_t aligned = (start + kVectorBytes - 1) / kVectorBytes * kVectorBytes;
    return reinterpret_cast<unsigned char*>(aligned) + offset * itemsize(dtype);
  }
  unsigned char* at(int64_t element_offset) { return data() + element_offset * itemsize(dtype); }
  // Calls f(pointer to element) for every element, in walk order (layout.h).
  template <class F>
  void for_each(F&& f) {
    for_each_row(layout, 0, layout.numel, [&](int64_t off, int64_t n, int64_t stride) {
      for (int64_t i = 0; i < n; ++i) f(at(off + i * stride));
    });
  }
};

HostTensor make_tensor(DType dtype, std::vector<int64_t> sizes, std::vector<int64_t> strides,
                       int64_t offset, std::mt19937& gen, double scale = 1.0) {
  HostTensor t{dtype, offset, sizes, strides, {}, Layout{}};
  make_layout(sizes.data(), strides.data(), static_cast<int>(sizes.size()), t.layout);
  int64_t span = 1;
  for (size_t d = 0; d < sizes.size(); ++d) span += (sizes[d] - 1) * strides[d];
  if (t.layout.numel == 0) span = 0;
  t.buffer.assign((span + offset) * itemsize(dtype) + 2 * kVectorBytes, 0);
  std::normal_distribution<double> normal;
  for (int64_t i = 0; i < span; ++i) store_from_double(t.at(i), dtype, scale * normal(gen));
  return t;
}

TensorDesc describe(HostTensor& t) {
  return TensorDesc{reinterpret_cast<uint64_t>(t.data()), t.dtype, t.layout};
}

struct Outputs {
  std::vector<double> norms;
  std::vector<int64_t> counts;
  double total = 0;
  double coef = 0;
  std::vector<unsigned char> bits;  // every output's raw bytes, for bitwise comparisons
  std::vector<unsigned> counters;   // the workspace's counters after the (last) call
};

// How run_stats runs the op: at most max_grid blocks a launch, the blocks in index order or in an
// order shuffled by order_seed (host_cuda.h launch), and `calls` calls over one workspace, its
// counters zeroed before each as ops_cuda.cpp's memset does (a CUDA graph replays the same way).
struct RunOptions {
  unsigned max_grid;
  unsigned order_seed = 0;
  int calls = 1;
};

// A byte that makes every double of the partials' workspace a NaN: a slot read before any block
// wrote it spoils the outputs.
constexpr unsigned char kStaleByte = 0xFF;

// The stats op as ops_cuda.cpp runs it, with `Table` tables.
template <class Table>
Outputs run_stats(std::vector<HostTensor>& tensors, NormSpec spec, Nonfinite policy,
                  double max_norm, const RunOptions& options) {
  std::vector<TensorDesc> descs;
  bool any_double = false;
  for (HostTensor& t : tensors) {
    descs.push_back(describe(t));
    any_double = any_double || t.dtype == DType::kFloat64;
  }
  const auto n = static_cast<int64_t>(tensors.size());
  const CallPlan plan = plan_call(descs, Table::kCapacity, Table::kDimCapacity);
  std::vector<Partial> chunk_partials(plan.num_chunks);
  std::vector<Partial> tensor_partials(n);
  std::memset(chunk_partials.data(), kStaleByte, chunk_partials.size() * sizeof(Partial));
  std::memset(tensor_partials.data(), kStaleByte, tensor_partials.size() * sizeof(Partial));
  std::vector<unsigned> counters(stats_counters(n));
  std::vector<double> norms64(n);
  std::vector<float> norms32(n);
  std::vector<int64_t> counts(kCountRows * (n + 1), -1);
  double total64 = 0;
  double coef64 = 0;
  float total32 = 0;
  float coef32 = 0;

  StatsArgs args{};
  args.chunk_partials = chunk_partials.data();
  args.tensor_partials = tensor_partials.data();
  args.counters = counters.data();
  args.norms = any_double ? static_cast<void*>(norms64.data()) : norms32.data();
  args.total_norm = any_double ? static_cast<void*>(&total64) : &total32;
  args.clip_coef = any_double ? static_cast<void*>(&coef64) : &coef32;
  args.counts = counts.data();
  args.num_tensors = n;
  args.max_norm = max_norm;
  args.spec = spec;
  args.policy = policy;
  args.out_double = any_double;
  auto table = std::make_unique<Table>();
  for (int call = 0; call < options.calls; ++call) {
    std::fill(counters.begin(), counters.end(), 0u);
    for (size_t k = 0; k < plan.launches.size(); ++k) {
      pack_launch(descs, plan.launches[k], *table);
      args.last_launch = k + 1 == plan.launches.size();
      const auto grid = static_cast<unsigned>(
          std::max<int64_t>(1, std::min<int64_t>(plan.launches[k].num_chunks, options.max_grid)));
      const Table& launched = *table;
      host_cuda::launch(
          grid, kThreads, [&] { gradstats_stats_kernel<Table>(launched, args); },
          options.order_seed);
    }
  }

  Outputs out;
  out.counts = counts;
  out.counters = counters;
  for (int64_t i = 0; i < n; ++i) out.norms.push_back(any_double ? norms64[i] : norms32[i]);
  out.total = any_double ? total64 : total32;
  out.coef = any_double ? coef64 : coef32;
  const auto append = [&](const void* p, size_t bytes) {
    const auto* c = static_cast<const unsigned char*>(p);
    out.bits.insert(out.bits.end(), c, c + bytes);
  };
  if (any_double) {
    append(norms64.data(), n * sizeof(double));
    append(&total64, sizeof(double));
    append(&coef64, sizeof(double));
  } else {
    append(norms32.data(), n * sizeof(float));
    append(&total32, sizeof(float));
    append(&coef32, sizeof(float));
  }
  append(counts.data(), counts.size() * sizeof(int64_t));
  return out;
}

// What the op must give: exact_partial over each tensor's elements in walk order, combined in
// list order, as the CPU kernel defines it.
Outputs reference(std::vector<HostTensor>& tensors, NormSpec spec, Nonfinite policy,
                  double max_norm) {
  const auto n = static_cast<int64_t>(tensors.size());
  Outputs out;
  out.counts.assign(kCountRows * (n + 1), 0);
  Partial all = empty_partial();
  bool any_double = false;
  for (int64_t i = 0; i < n; ++i) {
    HostTensor& t = tensors[i];
    any_double = any_double || t.dtype == DType::kFloat64;
    std::vector<double> values;
    t.for_each([&](unsigned char* p) { values.push_back(load_as_double(p, t.dtype)); });
    const Partial p = exact_partial([&](int64_t k) { return values[k]; },
                                    static_cast<int64_t>(values.size()), spec);
    out.norms.push_back(reported_norm(p, spec, policy));
    out.counts[kNanRow * (n + 1) + i] = p.nan;
    out.counts[kInfRow * (n + 1) + i] = p.inf;
    out.counts[kNonfiniteRow * (n + 1) + i] = p.nan + p.inf;
    combine(all, total_term(p, spec, policy), spec);
  }
  out.counts[kNanRow * (n + 1) + n] = all.nan;
  out.counts[kInfRow * (n + 1) + n] = all.inf;
  out.counts[kNonfiniteRow * (n + 1) + n] = all.nan + all.inf;
  const double total = reported_total(all, spec, policy);
  if (any_double) {
    out.total = total;
    out.coef = clip_coefficient<double>(total, max_norm, all, policy);
  } else {
    out.total = static_cast<float>(total);
    out.coef = clip_coefficient<float>(total, max_norm, all, policy);
  }
  return out;
}

// Every kind of tensor the kernels treat differently, with NaN/Inf when asked.
std::vector<HostTensor> make_list(bool with_double, bool with_nonfinite) {
  std::mt19937 gen(42);
  std::vector<HostTensor> ts;
  ts.push_back(make_tensor(DType::kFloat32, {3 * kChunkElems + 13}, {1}, 1, gen));
  ts.push_back(make_tensor(DType::kBFloat16, {kChunkElems + 5}, {1}, 3, gen));
  ts.push_back(make_tensor(DType::kFloat16, {300, 47}, {70, 1}, 0, gen));  // a column slice
  ts.push_back(make_tensor(DType::kFloat32, {0}, {1}, 0, gen));
  ts.push_back(make_tensor(DType::kFloat32, {2 * kChunkElems}, {1}, 0, gen, 1e-30));  // tiny
  ts.push_back(make_tensor(DType::kFloat32, {5000}, {1}, 2, gen, 0.0));               // zeros
  ts.push_back(make_tensor(DType::kFloat32, {1000}, {1}, 0, gen, 1e20));  // squares overflow
  ts.push_back(make_tensor(DType::kFloat16, {7}, {1}, 5, gen));
  ts.push_back(make_tensor(DType::kBFloat16, {9, 33}, {1, 18}, 1, gen));  // strided transpose
  ts.push_back(make_tensor(DType::kFloat16, {1000}, {1}, 1, gen, 1e4));   // norm > 65504
  if (with_double) {
    ts.push_back(make_tensor(DType::kFloat64, {kChunkElems + 1}, {1}, 1, gen));
    ts.push_back(make_tensor(DType::kFloat64, {100}, {1}, 0, gen, 1e200));  // squares overflow
  }
  if (with_nonfinite) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    store_from_double(ts[0].at(10), ts[0].dtype, nan);
    store_from_double(ts[0].at(2 * kChunkElems + 3), ts[0].dtype, -inf);
    store_from_double(ts[1].at(kChunkElems + 1), ts[1].dtype, inf);
    store_from_double(ts[2].at(70 * 5 + 4), ts[2].dtype, nan);  // row 5, column 4: in the view
    store_from_double(ts[7].at(6), ts[7].dtype, inf);
  }
  return ts;
}

std::string name_of(NormSpec spec, Nonfinite policy, bool with_double, bool with_nonfinite) {
  const char* policies[] = {"propagate", "skip", "zero"};
  return std::string("p=") + (spec.reciprocal ? "-" : "") + std::to_string(spec.p) + " " +
         policies[static_cast<int>(policy)] + (with_double ? " +float64" : "") +
         (with_nonfinite ? " +nonfinite" : "");
}

// Lists of more than three tensors take several launches with this table.
using Tiny = TensorTable<3, 2 * kMaxLayoutDims>;
constexpr unsigned kFewBlocks = 3;     // fewer blocks than chunks: blocks take several
constexpr unsigned kManyBlocks = 64;   // a block per chunk of make_list's lists
constexpr unsigned kShuffled = 12345;  // a seed for a shuffled block order
constexpr double kMaxNorm = 1.0;

// Counts exactly; norms, total and coefficient within kNormRtol.
void check_outputs(const Outputs& got, const Outputs& want, const std::string& what) {
  check(got.counts == want.counts, what + ": counts");
  bool norms_ok = true;
  for (size_t i = 0; i < want.norms.size(); ++i) {
    const bool ok = close(got.norms[i], want.norms[i]);
    if (!ok) {
      std::printf("  tensor %zu: norm %.17g, expected %.17g\n", i, got.norms[i], want.norms[i]);
    }
    norms_ok = norms_ok && ok;
  }
  check(norms_ok, what + ": per-tensor norms");
  check(close(got.total, want.total), what + ": total norm");
  check(close(got.coef, want.coef), what + ": clip coefficient");
}

// Runs the op every other way that must not change a bit of `got`: the list split into launches,
// one block, a block per chunk, a shuffled block order, and a second call over the same workspace.
void check_bitwise_invariant(std::vector<HostTensor>& tensors, NormSpec spec, Nonfinite policy,
                             const Outputs& got, const std::string& what) {
  const auto same = [&](const Outputs& other, const std::string& how) {
    check(other.bits == got.bits, what + ": " + how + " gives bitwise the same outputs");
  };
  same(run_stats<Tiny>(tensors, spec, policy, kMaxNorm, {kFewBlocks}), "a split into launches");
  same(run_stats<SmallTable>(tensors, spec, policy, kMaxNorm, {1}), "one block");
  same(run_stats<SmallTable>(tensors, spec, policy, kMaxNorm, {kManyBlocks}), "a block per chunk");
  same(run_stats<Tiny>(tensors, spec, policy, kMaxNorm, {kManyBlocks, kShuffled}),
       "a shuffled block order");
  same(run_stats<SmallTable>(tensors, spec, policy, kMaxNorm, {kFewBlocks, 0, 2}),
       "a second call over the same workspace");
}

void test_stats() {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // Every kind of norm: the fast paths, a general p, a p too large for 2^k scales, the 0 count,
  // and the reciprocal (negative) orders.
  const double norm_types[] = {2.0, 1.0, kInf, 3.0, 1100.0, 0.0, -1.0, -2.5, -kInf};
  const Nonfinite policies[] = {Nonfinite::kPropagate, Nonfinite::kSkip, Nonfinite::kZero};
  for (bool with_double : {false, true}) {
    for (bool with_nonfinite : {false, true}) {
      std::vector<HostTensor> tensors = make_list(with_double, with_nonfinite);
      for (double p : norm_types) {
        for (Nonfinite policy : policies) {
          if (!with_nonfinite && policy != Nonfinite::kPropagate) continue;
          const NormSpec spec = make_norm_spec(p);
          const std::string what = name_of(spec, policy, with_double, with_nonfinite);
          const Outputs want = reference(tensors, spec, policy, kMaxNorm);
          const Outputs got = run_stats<SmallTable>(tensors, spec, policy, kMaxNorm, {kFewBlocks});
          check_outputs(got, want, what);
          check_bitwise_invariant(tensors, spec, policy, got, what);
        }
      }
    }
  }
}

// The finish spread over the grid (kernels.cuh finish_chunk): many tensors of one chunk (finished
// by the block that read them), and tensors of 2, kWarpSize and kWarpSize + 1 chunks (a warp, then
// the whole block, combines their chunk partials) among them, over several launches. Against the
// reference, bitwise the same however it is run, and each counter counted what it should: a
// tensor's chunks (0 for a tensor of one chunk or none), the last launch's blocks.
void test_finish() {
  std::mt19937 gen(7);
  // More than a small table holds: the list takes two launches even with SmallTable.
  constexpr int kSingleChunkTensors = 150;
  // Sizes of the one-chunk tensors cycle through this many elements (every head and tail).
  constexpr int64_t kSmallSizes = 3001;
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64};
  std::vector<HostTensor> ts;
  for (int i = 0; i < kSingleChunkTensors; ++i) {
    const int64_t n = 1 + (int64_t{i} * 997) % kSmallSizes;
    ts.push_back(make_tensor(dtypes[i % 4], {n}, {1}, i % 5, gen));
  }
  const auto insert = [&](size_t at, HostTensor t) {
    ts.insert(ts.begin() + static_cast<std::ptrdiff_t>(at), std::move(t));
  };
  insert(3, make_tensor(DType::kBFloat16, {kWarpSize * kChunkElems}, {1}, 1, gen));
  insert(40, make_tensor(DType::kFloat32, {2 * kChunkElems - 7}, {1}, 0, gen));
  insert(41, make_tensor(DType::kFloat32, {0}, {1}, 0, gen));
  insert(90, make_tensor(DType::kFloat16, {(kWarpSize + 1) * kChunkElems}, {1}, 2, gen));
  insert(120, make_tensor(DType::kFloat32, {600, 200}, {256, 1}, 0, gen));  // strided, 2 chunks
  const double nan = std::numeric_limits<double>::quiet_NaN();
  store_from_double(ts[90].at(5 * kChunkElems + 11), ts[90].dtype, nan);  // an exact-path chunk

  const auto n = static_cast<int64_t>(ts.size());
  std::vector<unsigned> want_counters(stats_counters(n), 0u);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t chunks = chunk_count(ts[i].layout.numel);
    want_counters[i] = chunks > 1 ? static_cast<unsigned>(chunks) : 0u;
  }
  std::vector<TensorDesc> descs;
  for (HostTensor& t : ts) descs.push_back(describe(t));
  const CallPlan plan = plan_call(descs, SmallTable::kCapacity, SmallTable::kDimCapacity);
  want_counters[n] =
      static_cast<unsigned>(std::min<int64_t>(plan.launches.back().num_chunks, kManyBlocks));

  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (double p : {2.0, 3.0, kInf}) {
    const NormSpec spec = make_norm_spec(p);
    const std::string what = "finish, " + name_of(spec, Nonfinite::kPropagate, true, true);
    const Outputs want = reference(ts, spec, Nonfinite::kPropagate, kMaxNorm);
    const Outputs got =
        run_stats<SmallTable>(ts, spec, Nonfinite::kPropagate, kMaxNorm, {kManyBlocks, kShuffled});
    check_outputs(got, want, what);
    check(got.counters == want_counters, what + ": each counter counted its tensor's chunks");
    check_bitwise_invariant(ts, spec, Nonfinite::kPropagate, got, what);
  }
}

// The scale op as ops_cuda.cpp runs it.
void run_scale(std::vector<HostTensor>& tensors, float coef, const std::vector<int64_t>* zero) {
  std::vector<TensorDesc> descs;
  for (HostTensor& t : tensors) descs.push_back(describe(t));
  const CallPlan plan = plan_call(descs, SmallTable::kCapacity, SmallTable::kDimCapacity);
  ScaleArgs args{};
  args.coef = &coef;
  args.coef_dtype = DType::kFloat32;
  args.zero_counts = zero == nullptr ? nullptr : zero->data();
  args.zero_stride = 1;
  auto table = std::make_unique<SmallTable>();
  constexpr unsigned kGrid = 4;
  for (const LaunchPlan& launch : plan.launches) {
    pack_launch(descs, launch, *table);
    const SmallTable& launched = *table;
    host_cuda::launch(kGrid, kThreads, [&] { gradstats_scale_kernel<SmallTable>(launched, args); });
  }
}

void test_scale() {
  const float coefs[] = {0.3f, 1.0f, 2.0f, std::numeric_limits<float>::quiet_NaN()};
  for (float coef : coefs) {
    for (bool zeroing : {false, true}) {
      std::vector<HostTensor> tensors = make_list(true, true);
      std::vector<HostTensor> before = make_list(true, true);
      // Zero the non-finite elements of tensors 0 and 2 (tensor 1 has some too, but count 0).
      std::vector<int64_t> zero(tensors.size(), 0);
      zero[0] = zero[2] = 1;
      run_scale(tensors, coef, zeroing ? &zero : nullptr);
      const bool clips = !(coef >= 1.0f);
      bool ok = true;
      bool untouched = true;
      for (size_t i = 0; i < tensors.size(); ++i) {
        HostTensor& t = tensors[i];
        std::vector<unsigned char*> got_elements;
        t.for_each([&](unsigned char* p) { got_elements.push_back(p); });
        size_t k = 0;
        before[i].for_each([&](unsigned char* p) {
          const int item = itemsize(t.dtype);
          const double x = load_as_double(p, t.dtype);
          const bool zero_it = zeroing && zero[i] > 0 && !std::isfinite(x);
          unsigned char expected[sizeof(double)];
          std::memcpy(expected, p, item);
          if (zero_it) {
            store_from_double(expected, t.dtype, 0.0);
          } else if (clips) {
            // opmath: double for double, float for the others.
            const double product = t.dtype == DType::kFloat64
                                       ? x * static_cast<double>(coef)
                                       : static_cast<double>(static_cast<float>(x) * coef);
            store_from_double(expected, t.dtype, product);
          }
          const double want = load_as_double(expected, t.dtype);
          const double got = load_as_double(got_elements[k], t.dtype);
          ok = ok && ((std::isnan(want) && std::isnan(got)) || want == got);
          if (!clips && !zero_it)
            untouched = untouched && !std::memcmp(expected, got_elements[k], item);
          ++k;
        });
      }
      const std::string what = "scale by " + std::to_string(coef) + (zeroing ? ", zeroing" : "");
      check(ok, what + ": every element scaled in opmath, or zeroed");
      check(untouched, what + ": elements not scaled nor zeroed keep their bits");
    }
  }
}

}  // namespace

int main() {
  test_stats();
  test_finish();
  test_scale();
  return report();
}
