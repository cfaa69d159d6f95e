// CPU kernels of the gradstats ops. The tensors of a call are cut into pieces of at most
// kChunkElems elements; threads take contiguous runs of pieces balanced by element count; every
// piece writes its own Partial, and the partials are combined in piece order. The result is
// therefore bitwise the same for any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/features.h"
#include "cpu/simd.h"
#include "device_plan.h"
#include "layout.h"
#include "partial.h"

namespace gradstats {
namespace cpu {
namespace {

// Pieces ahead whose data a list of small tensors prefetches: enough loads in flight to cover a
// cache miss.
constexpr int64_t kPrefetchAhead = 8;
// Below this many elements in a call, waking threads costs more than it saves.
constexpr int64_t kSerialBelowElems = int64_t{1} << 15;

// Where a tensor's elements are: one contiguous range (contiguous, or permuted but dense: norms
// and counts do not depend on the order the elements are visited in), or rows (layout.h).
constexpr int32_t kFlat = -1;

struct Source {
  char* data;  // the tensor's first element
  int64_t numel;
  int64_t index;  // in the plan's list of tensors
  DType dtype;
  int32_t layout;  // kFlat, or an index into Plan::layouts
};

struct Piece {
  int64_t tensor;
  int64_t begin;  // element range in the tensor's walk order (layout.h)
  int64_t end;
};

struct Plan {
  std::vector<Source> sources;
  std::vector<Layout> layouts;  // of the tensors that are not flat
  std::vector<Piece> pieces;
  std::vector<int64_t> piece_start;  // elements before each piece, over all pieces
  int64_t total_elems = 0;
  bool single_pieces = true;  // no tensor has more than one piece

  // Calls f(offset, length, stride) for the rows holding elements [begin, end) of a source.
  template <typename F>
  void for_each_row(const Source& src, const Piece& piece, F&& f) const {
    if (src.layout == kFlat) return f(piece.begin, piece.end - piece.begin, int64_t{1});
    gradstats::for_each_row(layouts[src.layout], piece.begin, piece.end, f);
  }
};

void add_source(Plan& plan, const at::Tensor& t, int64_t index) {
  Source s{static_cast<char*>(t.data_ptr()), t.numel(), index, dtype_tag(t.scalar_type()), kFlat};
  if (!t.is_non_overlapping_and_dense()) {
    s.layout = static_cast<int32_t>(plan.layouts.size());
    plan.layouts.push_back(tensor_layout(t, index, "gradstats"));
  }
  const auto tensor = static_cast<int64_t>(plan.sources.size());
  plan.sources.push_back(s);
  plan.single_pieces = plan.single_pieces && s.numel <= kChunkElems;
  for (int64_t begin = 0; begin < s.numel; begin += kChunkElems) {
    plan.piece_start.push_back(plan.total_elems);
    plan.pieces.push_back(Piece{tensor, begin, std::min(s.numel, begin + kChunkElems)});
    plan.total_elems += plan.pieces.back().end - begin;
  }
}

// Runs body(piece_index) for every piece, spread over the intra-op threads by element count.
template <typename F>
void for_each_piece(const Plan& plan, F&& body) {
  const auto count = static_cast<int64_t>(plan.pieces.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  if (plan.total_elems < kSerialBelowElems || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      // Thread t takes the pieces that start in its share [t, t + 1) * total / threads.
      const auto share = [&](int64_t k) {
        return std::lower_bound(plan.piece_start.begin(), plan.piece_start.end(),
                                (plan.total_elems * k + threads - 1) / threads) -
               plan.piece_start.begin();
      };
      for (int64_t i = share(t); i < share(t + 1); ++i) body(i);
    }
  });
}

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64:
      return f(double{});
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(c10::Half{});
    case DType::kBFloat16:
      return f(c10::BFloat16{});
  }
}

template <typename T>
Partial row_partial(const T* p, int64_t n, int64_t stride, NormSpec spec) {
  const auto exact = [&] {
    return exact_partial([&](int64_t i) { return static_cast<double>(p[i * stride]); }, n, spec);
  };
  if (stride != 1 || !has_fast_path(spec)) return exact();
  const double sum = fast_row_sum(p, n, spec.kind);
  if (!std::isfinite(sum)) return exact();
  if constexpr (!std::is_same_v<T, double>) {
    const bool may_have_underflowed = spec.kind == NormKind::kL2 && sum < kUnderflowGuard &&
                                      fast_row_sum(p, n, NormKind::kInf) != 0.0;
    if (may_have_underflowed) return exact();
  }
  Partial r = empty_partial();
  r.sum = sum;
  rescale(r, spec);
  return r;
}

Partial piece_partial(const Plan& plan, const Piece& piece, NormSpec spec) {
  const Source& src = plan.sources[piece.tensor];
  Partial acc = empty_partial();
  dispatch_dtype(src.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* base = reinterpret_cast<const T*>(src.data);
    if (src.layout == kFlat) {  // one row: its partial is the piece's
      acc = row_partial(base + piece.begin, piece.end - piece.begin, 1, spec);
      return;
    }
    plan.for_each_row(src, piece, [&](int64_t off, int64_t n, int64_t stride) {
      combine(acc, row_partial(base + off, n, stride, spec), spec);
    });
  });
  return acc;
}

template <typename T>
void write_outputs(const std::vector<Partial>& per_tensor, const Partial& all, NormSpec spec,
                   Nonfinite policy, double max_norm, const StatsOutputs& out) {
  const auto n = static_cast<int64_t>(per_tensor.size());
  T* norms = out.norms.data_ptr<T>();
  int64_t* counts = out.counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    norms[i] = static_cast<T>(reported_norm(per_tensor[i], spec, policy));
    store_counts(counts, n, i, per_tensor[i]);
  }
  store_counts(counts, n, n, all);
  store_total(out.total_norm.data_ptr<T>(), out.clip_coef.data_ptr<T>(), all, spec, policy,
              max_norm);
}

// The plan of a list: the pieces of every tensor the kernels walk (the others, only ever handed to
// scale_, are scaled by scale_unwalkable).
class CpuPlan final : public DevicePlan {
 public:
  explicit CpuPlan(std::vector<at::Tensor> tensors) : DevicePlan(std::move(tensors)) {
    plan_.sources.reserve(tensors_.size());
    plan_.pieces.reserve(tensors_.size());
    plan_.piece_start.reserve(tensors_.size());
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (is_walkable(tensors_[i])) add_source(plan_, tensors_[i], static_cast<int64_t>(i));
    }
  }

  void rebind(const std::vector<uint64_t>& addresses) override {
    for (Source& src : plan_.sources) src.data = reinterpret_cast<char*>(addresses[src.index]);
  }

  StatsOutputs stats(NormSpec spec, Nonfinite policy, double max_norm, bool wide) const override {
    // Reused from call to call (a GradPlan calls its plan every step, with the GIL held): a fresh
    // vector of a Partial per tensor would cost its allocation and page faults each time.
    std::vector<Partial>& per_tensor = scratch_;
    per_tensor.assign(count_, empty_partial());
    if (plan_.single_pieces) {
      // Every tensor in one piece (a list of small tensors): each piece's partial is its tensor's.
      for_each_piece(plan_, [&](int64_t i) {
        const Piece& piece = plan_.pieces[i];
        if (i + kPrefetchAhead < static_cast<int64_t>(plan_.pieces.size())) {
          // Small tensors lie scattered in memory: fetch their values a few pieces ahead.
          __builtin_prefetch(plan_.sources[plan_.pieces[i + kPrefetchAhead].tensor].data);
        }
        per_tensor[plan_.sources[piece.tensor].index] = piece_partial(plan_, piece, spec);
      });
    } else {
      std::vector<Partial>& partials = piece_scratch_;
      partials.resize(plan_.pieces.size());
      for_each_piece(plan_,
                     [&](int64_t i) { partials[i] = piece_partial(plan_, plan_.pieces[i], spec); });
      for (size_t i = 0; i < plan_.pieces.size(); ++i) {
        combine(per_tensor[plan_.sources[plan_.pieces[i].tensor].index], partials[i], spec);
      }
    }
    Partial all = empty_partial();
    for (const Partial& p : per_tensor) combine(all, total_term(p, spec, policy), spec);

    const StatsOutputs out = allocate(wide);
    if (out.norms.scalar_type() == at::kDouble) {
      write_outputs<double>(per_tensor, all, spec, policy, max_norm, out);
    } else {
      write_outputs<float>(per_tensor, all, spec, policy, max_norm, out);
    }
    return out;
  }

  void scale(const at::Tensor& coef_tensor,
             const std::optional<at::Tensor>& zero_counts) const override {
    const double coef = coef_tensor.item<double>();
    const bool scales = clips(coef);
    const at::Tensor counts = zero_counts ? zero_counts->contiguous() : at::Tensor();
    const int64_t* nonfinite = zero_counts ? counts.data_ptr<int64_t>() : nullptr;
    const auto zeroes = [&](const Source& src) {
      return nonfinite != nullptr && nonfinite[src.index] > 0;
    };
    // Nothing clipped and nothing zeroed: no tensor is visited at all.
    if (scales || nonfinite != nullptr) {
      const double factor = scales ? coef : 1.0;
      const auto pieces = static_cast<int64_t>(plan_.pieces.size());
      for_each_piece(plan_, [&](int64_t i) {
        const Piece& piece = plan_.pieces[i];
        const Source& src = plan_.sources[piece.tensor];
        const bool zero = zeroes(src);
        if (!scales && !zero) return;
        if (i + kPrefetchAhead < pieces) {
          __builtin_prefetch(plan_.sources[plan_.pieces[i + kPrefetchAhead].tensor].data, 1);
        }
        dispatch_dtype(src.dtype, [&](auto tag) {
          using T = decltype(tag);
          T* base = reinterpret_cast<T*>(src.data);
          plan_.for_each_row(src, piece, [&](int64_t off, int64_t n, int64_t stride) {
            scale_row(base + off, n, stride, factor, zero);
          });
        });
      });
    }
    scale_unwalkable(tensors_, unwalkable_, coef_tensor, zero_counts);
  }

 private:
  Plan plan_;
  mutable std::vector<Partial> scratch_;        // a partial per tensor
  mutable std::vector<Partial> piece_scratch_;  // a partial per piece, when tensors have several
};

}  // namespace
}  // namespace cpu

std::unique_ptr<DevicePlan> make_cpu_plan(std::vector<at::Tensor> tensors) {
  return std::make_unique<cpu::CpuPlan>(std::move(tensors));
}

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("stats", &stats_op);
  m.impl("scale_", &scale_op);
  m.impl("feature_stats", &cpu::feature_stats_cpu);
}

}  // namespace gradstats
