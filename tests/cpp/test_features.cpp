// feature_stats' sizing and its CUDA kernels, without a GPU. The sizing (csrc/feature_stats.h
// feature_pieces, csrc/cuda/feature_grid.h): pieces cover the rows exactly, never more than asked,
// a workspace of at most a quarter of the input (none for one piece), each block's threads a
// one-to-one box, the features covered by the tiles. The kernels (csrc/cuda/features.cuh) run on
// the host (host_cuda.h): against a serial accumulation of each feature, counts and extremes
// exactly and sums within 1e-12, for every dtype, rows of features (inner 1) and runs (NCHW: inner
// above and below a block's width), partial tiles, several pieces (the combine kernel), NaN/Inf and
// empty inputs; bitwise the same in any block order. Built and run by tests/test_planner.py; ends
// with "N passed, N failed". This checks the kernels' logic, not the GPU's behaviour.
#include <cmath>
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
#include "cuda/features.cuh"
#include "cuda/launch.h"
// clang-format on

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "check.h"

using namespace gradstats;
using namespace gradstats::gpu;

namespace {

// The kernels sum in float64 in another order than a serial loop: only rounding differs.
constexpr double kSumRtol = 1e-12;
// max_blocks of an H200 (132 SMs x kFeatureBlocksPerSm), of a small GPU, and of one block.
constexpr int64_t kH200Blocks = 132 * kFeatureBlocksPerSm;
constexpr int64_t kSmallBlocks = 7;
constexpr unsigned kShuffled = 4242;  // a seed for a shuffled block order

std::string shape_name(const FeatureShape& s, int64_t itemsize, int64_t max_blocks) {
  return "[" + std::to_string(s.outer) + ", " + std::to_string(s.features) + ", " +
         std::to_string(s.inner) + "] x" + std::to_string(itemsize) + " B, " +
         std::to_string(max_blocks) + " blocks";
}

bool is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

void check_grid(const FeatureShape& s, int64_t itemsize, int64_t max_blocks) {
  const std::string what = shape_name(s, itemsize, max_blocks);
  const FeatureGrid g = feature_grid(s, itemsize, max_blocks);
  check(is_pow2(g.lanes) && is_pow2(g.group) && is_pow2(g.rows) &&
            g.lanes * g.group * g.rows == kFeatureThreads,
        what + ": a box of kFeatureThreads threads, each side a power of two");
  check(g.lanes >= std::min<int64_t>(s.inner, kFeatureThreads) || s.inner == 0,
        what + ": lanes span the run, up to a block");
  check(g.tiles * g.group >= s.features && (g.tiles - 1) * g.group < s.features,
        what + ": the tiles cover the features, none empty");
  std::vector<int> seen(kFeatureThreads, 0);
  for (int32_t t = 0; t < kFeatureThreads; ++t) {
    const FeatureLane at = feature_lane(g, t);
    if (at.lane < g.lanes && at.feature < g.group && at.row < g.rows) {
      ++seen[(at.row * g.group + at.feature) * g.lanes + at.lane];
    }
  }
  bool one_to_one = true;
  for (int n : seen) one_to_one = one_to_one && n == 1;
  check(one_to_one, what + ": each place in the box has one thread");

  const FeaturePieces& p = g.pieces;
  const int64_t max_pieces = std::max<int64_t>(1, max_blocks / g.tiles);
  check(p.count >= 1 && p.rows >= 1 && p.count <= max_pieces, what + ": 1 to max_pieces pieces");
  if (s.outer > 0 && s.inner > 0) {
    check((p.count - 1) * p.rows < s.outer && s.outer <= p.count * p.rows,
          what + ": the pieces cover the rows, none empty");
  }
  const int64_t input_bytes = s.outer * s.features * s.inner * itemsize;
  const int64_t bytes = feature_workspace_bytes(s, p);
  check(p.count == 1 ? bytes == 0 : bytes <= input_bytes / 4,
        what + ": no workspace for one piece, else at most a quarter of the input");
  const FeatureGrid c = feature_combine_grid(s, p);
  check(c.lanes == 1 && c.group * c.rows == kFeatureThreads && c.tiles * c.group >= s.features &&
            c.pieces.rows == p.count && c.pieces.count == 1,
        what + ": the combine grid reads every piece of every feature in one pass");
}

void test_grids() {
  const FeatureShape shapes[] = {
      {65536, 1024, 1},  // [32, 2048, 1024] over the last dim: 4 tiles of 256 features
      {100, 65536, 1},   // wide features, few rows: was 14x the input in partials, now one piece
      {32, 64, 3136},    // NCHW [32, 64, 56, 56]
      {4096, 3, 5},     {49157, 4, 1},   {1, 7, 1},      {0, 4, 1},
      {3, 4, 0},        {1000003, 1, 1}, {7, 1000, 300},
  };
  for (const FeatureShape& s : shapes) {
    for (int64_t itemsize : {2, 4, 8}) {
      for (int64_t blocks : {int64_t{1}, kSmallBlocks, kH200Blocks, int64_t{1} << 20}) {
        check_grid(s, itemsize, blocks);
      }
    }
  }
  // The case: few blocks, and partials far below the input.
  const FeatureShape big{65536, 1024, 1};
  const FeatureGrid g = feature_grid(big, 4, kH200Blocks);
  check(g.tiles == 4 && g.blocks() <= kH200Blocks, "[32, 2048, 1024]: a few blocks per SM");
  check(feature_pieces({100, 65536, 1}, 4, kH200Blocks).count == 1,
        "65,536 features of 100 rows: one piece, no workspace");
}

double load(const float& x) { return x; }
double load(const double& x) { return x; }
double load(const c10::Half& x) { return static_cast<float>(x); }
double load(const c10::BFloat16& x) { return static_cast<float>(x); }

// Random values of a wide range, with NaN and +-Inf sprinkled in.
template <typename T>
std::vector<T> make_input(const FeatureShape& s, std::mt19937& gen) {
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<T> data(static_cast<size_t>(s.outer * s.features * s.inner));
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (T& x : data) {
    const int k = pick(gen);
    const double v = k == 0 ? std::nan("") : k == 1 ? kInf : k == 2 ? -kInf : 100.0 * normal(gen);
    x = static_cast<T>(static_cast<float>(v));
  }
  return data;
}

template <typename T>
std::vector<double> serial(const std::vector<T>& data, const FeatureShape& s,
                           std::vector<double>& abs_sum) {
  std::vector<double> out(static_cast<size_t>(kFeatureRows * s.features));
  abs_sum.assign(static_cast<size_t>(s.features), 0.0);
  for (int64_t f = 0; f < s.features; ++f) {
    FeatureAcc acc = empty_feature_acc();
    for (int64_t o = 0; o < s.outer; ++o) {
      for (int64_t i = 0; i < s.inner; ++i) {
        const double x = load(data[(o * s.features + f) * s.inner + i]);
        add_value(acc, x);
        if (std::isfinite(x)) abs_sum[f] += std::fabs(x);
      }
    }
    store_feature(acc, out.data(), f, s.features);
  }
  return out;
}

// The op as ops_cuda.cpp runs it, the workspace's stale bytes NaN.
template <typename T>
std::vector<double> run_kernels(const std::vector<T>& data, const FeatureShape& s,
                                int64_t max_blocks, unsigned order_seed) {
  const FeatureGrid g = feature_grid(s, static_cast<int64_t>(sizeof(T)), max_blocks);
  std::vector<FeatureAcc> partials(static_cast<size_t>(feature_workspace_bytes(s, g.pieces)) /
                                   sizeof(FeatureAcc));
  std::memset(partials.data(), 0xFF, partials.size() * sizeof(FeatureAcc));
  std::vector<double> out(static_cast<size_t>(kFeatureRows * s.features), std::nan(""));
  host_cuda::launch(
      static_cast<unsigned>(g.blocks()), kFeatureThreads,
      [&] { gradstats_feature_piece_kernel<T>(data.data(), s, g, partials.data(), out.data()); },
      order_seed);
  if (g.pieces.count > 1) {
    const FeatureGrid c = feature_combine_grid(s, g.pieces);
    host_cuda::launch(
        static_cast<unsigned>(c.blocks()), kFeatureThreads,
        [&] { gradstats_feature_combine_kernel(partials.data(), s, c, out.data()); }, order_seed);
  }
  return out;
}

template <typename T>
void check_kernels(const FeatureShape& s, int64_t max_blocks, const std::string& dtype) {
  const std::string what = dtype + " " + shape_name(s, sizeof(T), max_blocks);
  std::mt19937 gen(static_cast<unsigned>(s.outer * 31 + s.features * 7 + s.inner));
  const std::vector<T> data = make_input<T>(s, gen);
  std::vector<double> scale;  // each feature's sum of |x|
  const std::vector<double> want = serial(data, s, scale);
  const std::vector<double> got = run_kernels(data, s, max_blocks, 0);
  bool exact = true;
  bool sums = true;
  for (int64_t r = 0; r < kFeatureRows; ++r) {
    for (int64_t f = 0; f < s.features; ++f) {
      const double a = got[r * s.features + f];
      const double b = want[r * s.features + f];
      if (r == kFeatSumRow || r == kFeatSumSqRow) {
        // A sum's rounding error is relative to the sum of its terms' magnitudes.
        const double magnitude = r == kFeatSumRow ? scale[f] : b;
        sums = sums && std::fabs(a - b) <= kSumRtol * magnitude;
      } else {
        exact = exact && a == b;
      }
    }
  }
  check(exact, what + ": counts and extremes exact");
  check(sums, what + ": sums within 1e-12");
  const std::vector<double> again = run_kernels(data, s, max_blocks, kShuffled);
  check(std::memcmp(again.data(), got.data(), got.size() * sizeof(double)) == 0,
        what + ": bitwise the same in a shuffled block order");
}

void test_kernels() {
  for (int64_t blocks : {kSmallBlocks, kH200Blocks}) {
    check_kernels<float>({40000, 3, 1}, blocks, "float32");  // rows of 3 features, two pieces
    check_kernels<c10::BFloat16>({300, 17, 1}, blocks, "bfloat16");  // a partial group
    check_kernels<c10::Half>({9, 5, 300}, blocks, "float16");        // runs longer than a block
    check_kernels<double>({7, 6, 3}, blocks, "float64");             // runs of 3 in 4 lanes
    check_kernels<float>({2000, 40, 2}, blocks, "float32");          // several pieces
    check_kernels<float>({5, 300, 1}, blocks, "float32");            // two tiles
    check_kernels<float>({0, 4, 1}, blocks, "float32");              // no rows
    check_kernels<float>({3, 4, 0}, blocks, "float32");              // empty runs
  }
}

}  // namespace

int main() {
  test_grids();
  test_kernels();
  return report();
}
