// mmfast::combine_ on CPU tensors, and its two passes as operators of their own
// (mmfast::gram_, mmfast::combine_pass_: FSDP2 runs them on local shards with an
// all-reduce of the per-tensor sums between them). combine_ is exactly these two passes
// (the Gram rides along with the combine for "dgl" and "sum") plus the statistics.
//
// The argument checks and the chunk table are built once per layout (csrc/args.h) and
// cached; a later call with the same layout only fingerprints its arguments.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common.h"

namespace mmfast::cpu {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

enum class Method { kMMPareto, kDGL, kSum };

Method parse_method(c10::string_view m) {
  if (m == "mmpareto") return Method::kMMPareto;
  if (m == "dgl") return Method::kDGL;
  if (m == "sum") return Method::kSum;
  TORCH_CHECK_VALUE(false, "method: expected one of 'mmpareto', 'dgl', 'sum', got '", std::string(m), "'");
}

// Per-tensor sums of per-chunk partials, each tensor's chunks in order: any thread count
// gives the same bits. pt: [T, 4] (aa, ab, bb, 1 if a value read was not finite);
// sq: [T] (<out, out>). Either may be null.
void reduce_partials(const CpuLayout& lay, const std::vector<Partial>& partials, double* pt, double* sq) {
  const size_t n = lay.refs.size();
  if (pt) std::fill(pt, pt + 4 * n, 0.0);
  if (sq) std::fill(sq, sq + n, 0.0);
  for (size_t c = 0; c < lay.chunks.size(); ++c) {
    const Partial& p = partials[c];
    const int64_t t = lay.chunks[c].tensor;
    if (pt) {
      pt[4 * t] += p.aa;
      pt[4 * t + 1] += p.ab;
      pt[4 * t + 2] += p.bb;
      if (!p.finite) pt[4 * t + 3] = 1.0;
    }
    if (sq) sq[t] += p.sq;
  }
}

// Pass 1: per-tensor (aa, ab, bb, non-finite) into pt [T, 4].
void gram_pass(const CpuLayout& lay, double* pt) {
  const int64_t C = static_cast<int64_t>(lay.chunks.size());
  std::vector<Partial> partials(C);
  for_chunks(C, lay.total, [&](int64_t b, int64_t e) { gram_chunks(lay.refs.data(), lay.chunks.data(), b, e, partials.data()); });
  reduce_partials(lay, partials, pt, nullptr);
}

struct GroupStats {
  at::Tensor gram, cos, weights, conflict;
};

// Group sums of the per-tensor Gram in tensor order, the weights, cosines and conflicts.
// A group id no tensor uses gets neutral statistics: Gram 0, cosine 0, no conflict,
// weights 0.5 / 0.5 (MMPareto).
GroupStats group_stats(const CpuLayout& lay, const double* pt, Method method, double alpha) {
  const int64_t G = lay.num_groups;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  GroupStats s{at::zeros({G, 3}, f64), at::empty({G}, f64), at::empty({G, 2}, f64),
               at::empty({G}, at::TensorOptions().dtype(at::kBool))};
  double* gram = s.gram.data_ptr<double>();
  for (size_t t = 0; t < lay.groups.size(); ++t) {
    const int64_t g = lay.groups[t];
    if (g < 0) continue;
    for (int j = 0; j < 3; ++j) gram[3 * g + j] += pt[4 * t + j];
  }
  double* W = s.weights.data_ptr<double>();
  double* cos = s.cos.data_ptr<double>();
  bool* conflict = s.conflict.data_ptr<bool>();
  for (int64_t g = 0; g < G; ++g) {
    const double AA = gram[3 * g], AB = gram[3 * g + 1], BB = gram[3 * g + 2];
    const bool clash = lay.used[g] && !(AB > 0);  // a NaN counts as a conflict, as in the reference
    double w = 0.5;
    if (clash) w = AB >= AA ? 0.999 : (AB >= BB ? 0.001 : (BB - AB) / (AA + BB - 2 * AB));
    W[2 * g] = method == Method::kMMPareto ? w : (method == Method::kSum ? 1.0 : 0.0);
    W[2 * g + 1] = method == Method::kMMPareto ? 1 - w : (method == Method::kSum ? 1.0 : alpha);
    const double denom = std::sqrt(AA) * std::sqrt(BB);
    cos[g] = denom == 0 ? 0.0 : AB / denom;  // NaN propagates
    conflict[g] = clash;
  }
  return s;
}

// Pass 2: out = ca a + cb b per tensor. MMPareto's coefficients come from the per-tensor
// Gram pt and the group weights; "dgl" and "sum" fix them by the tensor's role (and then
// the Gram rides along into pt). sq [T]: <out, out> per tensor, before any clip.
void combine_pass(const CpuLayout& lay, Method method, double* pt, const double* weights, double gamma, double alpha,
                  double* sq) {
  const size_t n = lay.refs.size();
  std::vector<Coef> coefs(n);
  for (size_t t = 0; t < n; ++t) {
    const int64_t g = lay.groups[t];
    if (method == Method::kMMPareto) {
      if (g < 0) {
        coefs[t] = {1.0, 1.0, kAB};
        continue;
      }
      const double w = weights[2 * g], u = weights[2 * g + 1];
      // ||n_t||^2 and ||a_t + b_t||^2 from the fp64 Gram: no fourth backward, no extra pass.
      // The Gram is exact to 2^-36 of the terms (precision.h), which keeps ||n_t|| to 1e-8
      // relative even at noise 1e-4 under b = -3a; accumulating ||n_t||^2 in the combine
      // pass instead would need a third pass to apply the scale.
      const double s = mmpareto_scale(pt[4 * t], pt[4 * t + 1], pt[4 * t + 2], w, u, gamma);
      coefs[t] = {2 * s * w, 2 * s * u, kAB};
    } else if (method == Method::kSum) {
      coefs[t] = {1.0, 1.0, kAB};
    } else if (!lay.fusion.empty() && lay.fusion[t]) {
      coefs[t] = {1.0, 0.0, kA};
    } else if (g >= 0) {
      coefs[t] = {0.0, alpha, kB};
    } else {
      coefs[t] = {1.0, alpha, kAB};
    }
  }
  const bool with_gram = method != Method::kMMPareto;
  const int64_t C = static_cast<int64_t>(lay.chunks.size());
  std::vector<Partial> partials(C);
  for_chunks(C, lay.total, [&](int64_t b, int64_t e) {
    combine_chunks(lay.refs.data(), coefs.data(), lay.chunks.data(), b, e, with_gram, partials.data());
  });
  reduce_partials(lay, partials, with_gram ? pt : nullptr, sq);
}

std::vector<NamedList> combine_lists(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni) {
  return {{"out", out, true}, {"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}};
}

}  // namespace

LayoutCache<CpuLayout>& cpu_cache() {
  static LayoutCache<CpuLayout> c(64);
  return c;
}

std::shared_ptr<CpuLayout> cpu_layout(int64_t op, const std::vector<NamedList>& lists, at::IntArrayRef groups,
                                      at::IntArrayRef fusion, int ia, int ib, int io) {
  return cpu_cache().get(layout_key(op, lists, groups, fusion), [&] {
    auto lay = std::make_shared<CpuLayout>();
    lay->num_groups = check_args(lists, groups, fusion);
    check_cpu(lists[0].tensors);
    const size_t n = lists[0].tensors.size();
    const at::TensorList a = lists[ia].tensors, b = lists[ib].tensors;
    lay->refs.resize(n);
    for (size_t i = 0; i < n; ++i) {
      void* o = io >= 0 ? lists[io].tensors[i].data_ptr() : nullptr;
      lay->refs[i] = {a[i].const_data_ptr(), b[i].const_data_ptr(), o, dtype_code(a[i].scalar_type())};
      add_chunks(lay->chunks, static_cast<int64_t>(i), a[i].numel());
      lay->total += a[i].numel();
    }
    lay->groups.assign(groups.begin(), groups.end());
    lay->fusion.assign(fusion.begin(), fusion.end());
    lay->used.assign(lay->num_groups, 0);
    for (int64_t g : groups)
      if (g >= 0) lay->used[g] = 1;
    return lay;
  });
}

Stats combine_cpu(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, at::IntArrayRef groups,
                  at::IntArrayRef fusion, c10::string_view method_name, double gamma, double alpha,
                  std::optional<double> max_norm) {
  const Method method = parse_method(method_name);
  check_scalars(gamma, alpha, max_norm);
  const auto lay = cpu_layout(kOpCombine, combine_lists(out, grads_mm, grads_uni), groups, fusion, 1, 2, 0);
  const size_t n = lay->refs.size();
  std::vector<double> pt(4 * n), sq(n);
  if (method == Method::kMMPareto) gram_pass(*lay, pt.data());
  // For "dgl" and "sum" the weights do not depend on the Gram: the one pass computes it.
  GroupStats s = method == Method::kMMPareto ? group_stats(*lay, pt.data(), method, alpha) : GroupStats{};
  const double* W = method == Method::kMMPareto ? s.weights.data_ptr<double>() : nullptr;
  combine_pass(*lay, method, pt.data(), W, gamma, alpha, sq.data());
  if (method != Method::kMMPareto) s = group_stats(*lay, pt.data(), method, alpha);

  double total_sq = 0;
  bool all_finite = true;
  for (size_t t = 0; t < n; ++t) {
    total_sq += sq[t];
    all_finite &= pt[4 * t + 3] == 0.0;
  }
  const double total_norm = std::sqrt(total_sq);
  const double clip = clip_in_place(lay->refs, lay->chunks, lay->total, max_norm, total_norm);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  return {s.gram, s.cos, s.weights, s.conflict, at::scalar_tensor(total_norm, f64), at::scalar_tensor(clip, f64),
          at::scalar_tensor(all_finite, at::TensorOptions().dtype(at::kBool))};
}

// combine_'s first pass alone: per-tensor [T, 4] fp64 (aa, ab, bb, 1 if non-finite).
at::Tensor gram_cpu(at::TensorList grads_mm, at::TensorList grads_uni) {
  const std::vector<int64_t> outside(grads_mm.size(), -1);  // no groups: one layout per list
  const auto lay =
      cpu_layout(kOpGram, {{"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}}, outside, {}, 0, 1, -1);
  at::Tensor pt = at::empty({static_cast<int64_t>(lay->refs.size()), 4}, at::TensorOptions().dtype(at::kDouble));
  gram_pass(*lay, pt.data_ptr<double>());
  return pt;
}

// Checks a per-tensor sums argument: [T, 4] fp64, contiguous, on the tensors' device.
void check_per_tensor(const at::Tensor& pt, int64_t n, c10::Device device) {
  TORCH_CHECK_VALUE(pt.scalar_type() == at::kDouble && pt.dim() == 2 && pt.size(0) == n && pt.size(1) == 4 &&
                        pt.is_contiguous() && pt.device() == device,
                    "per_tensor: expected a contiguous float64 tensor of shape (", n, ", 4) on ", device, ", got ",
                    pt.scalar_type(), " ", pt.sizes(), " on ", pt.device());
}

// combine_'s second pass (MMPareto) from per-tensor Gram sums (gram_'s, all-reduced
// across shards): writes out, returns (gram[G, 3], cos[G], weights[G, 2], conflict[G],
// out_sq[T]) where out_sq is <out, out> per tensor (local: sum it across shards too).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> combine_pass_cpu(
    at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, const at::Tensor& per_tensor,
    at::IntArrayRef groups, double gamma) {
  check_scalars(gamma, 0.0, std::nullopt);
  const auto lay = cpu_layout(kOpCombine, combine_lists(out, grads_mm, grads_uni), groups, {}, 1, 2, 0);
  const int64_t n = static_cast<int64_t>(lay->refs.size());
  check_per_tensor(per_tensor, n, out[0].device());
  at::Tensor pt = per_tensor.clone();  // combine_pass reads it only, but keep the caller's own
  GroupStats s = group_stats(*lay, pt.data_ptr<double>(), Method::kMMPareto, 0.0);
  at::Tensor sq = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  combine_pass(*lay, Method::kMMPareto, pt.data_ptr<double>(), s.weights.data_ptr<double>(), gamma, 0.0,
               sq.data_ptr<double>());
  return {s.gram, s.cos, s.weights, s.conflict, sq};
}

int64_t cpu_layouts_cached() { return static_cast<int64_t>(cpu_cache().size()); }

}  // namespace mmfast::cpu

TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  // combine_'s two passes, for callers that sum the per-tensor terms across shards in
  // between (mmfast/_combine.py: gram_pass, combine_pass_). per_tensor: [T, 4] float64
  // (aa, ab, bb, 1 where a value read was not finite).
  m.def("gram_(Tensor[] grads_mm, Tensor[] grads_uni) -> Tensor");
  m.def(
      "combine_pass_(Tensor(a!)[] out, Tensor[] grads_mm, Tensor[] grads_uni, Tensor per_tensor, int[] groups, "
      "float gamma) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // For tests: [full argument checks run so far, CPU layouts cached now].
  m.def("_layout_stats() -> int[]", []() -> std::vector<int64_t> {
    return {mmfast::layout_counters().checks.load(), mmfast::cpu::cpu_layouts_cached()};
  });
}

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("combine_", &mmfast::cpu::combine_cpu);
  m.impl("gram_", &mmfast::cpu::gram_cpu);
  m.impl("combine_pass_", &mmfast::cpu::combine_pass_cpu);
}

TORCH_LIBRARY_IMPL(mmfast, ADInplaceOrView, m) {
  m.impl("combine_pass_", torch::CppFunction::makeFromBoxedFunction<&mmfast::bump_written_then_redispatch>());
}
