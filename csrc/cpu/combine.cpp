// mmfast::combine_ on CPU tensors: argument checks, the chunk table, the small
// per-tensor and per-group maths between the passes, and the statistics.
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

}  // namespace

Stats combine_cpu(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, at::IntArrayRef groups,
                  at::IntArrayRef fusion, c10::string_view method_name, double gamma, double alpha,
                  std::optional<double> max_norm) {
  const Method method = parse_method(method_name);
  check_scalars(gamma, alpha, max_norm);
  const int64_t num_groups = check_args(
      {{"out", out, true}, {"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}}, groups, fusion);
  check_cpu(out);
  const size_t n = out.size();
  std::vector<TensorRef> refs(n);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    refs[i] = {grads_mm[i].const_data_ptr(), grads_uni[i].const_data_ptr(), out[i].data_ptr(),
               dtype_code(out[i].scalar_type())};
    const int64_t numel = out[i].numel();
    add_chunks(chunks, static_cast<int64_t>(i), numel);
    total += numel;
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Partial> partials(n_chunks);

  // Per-tensor sums in chunk order, then per-group sums in tensor order: fixed
  // orders, so any thread count gives the same bits.
  std::vector<double> t_aa(n, 0.0), t_ab(n, 0.0), t_bb(n, 0.0), t_sq(n, 0.0);
  bool all_finite = true;
  auto reduce_partials = [&](bool gram, bool sq) {
    for (int64_t c = 0; c < n_chunks; ++c) {
      const Partial& p = partials[c];
      const int64_t t = chunks[c].tensor;
      if (gram) {
        t_aa[t] += p.aa;
        t_ab[t] += p.ab;
        t_bb[t] += p.bb;
      }
      if (sq) t_sq[t] += p.sq;
      all_finite &= p.finite;
    }
  };

  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor gram = at::zeros({num_groups, 3}, f64);
  double* G = gram.data_ptr<double>();
  std::vector<char> used(num_groups, 0);  // empty groups get neutral statistics
  auto group_sums = [&]() {
    for (size_t t = 0; t < n; ++t) {
      if (groups[t] < 0) continue;
      double* g = G + 3 * groups[t];
      used[groups[t]] = 1;
      g[0] += t_aa[t];
      g[1] += t_ab[t];
      g[2] += t_bb[t];
    }
  };

  at::Tensor weights = at::empty({num_groups, 2}, f64);
  double* Wt = weights.data_ptr<double>();
  std::vector<Coef> coefs(n);

  if (method == Method::kMMPareto) {
    for_chunks(n_chunks, total, [&](int64_t b, int64_t e) { gram_chunks(refs.data(), chunks.data(), b, e, partials.data()); });
    reduce_partials(true, false);
    group_sums();
    for (int64_t g = 0; g < num_groups; ++g) {
      const double AA = G[3 * g], AB = G[3 * g + 1], BB = G[3 * g + 2];
      double w = 0.5;
      if (used[g] && !(AB > 0)) {  // conflict (a NaN counts as one, as in the reference)
        if (AB >= AA) w = 0.999;
        else if (AB >= BB) w = 0.001;
        else w = (BB - AB) / (AA + BB - 2 * AB);
      }
      Wt[2 * g] = w;
      Wt[2 * g + 1] = 1 - w;
    }
    for (size_t t = 0; t < n; ++t) {
      if (groups[t] < 0) {
        coefs[t] = {1.0, 1.0, kAB};
        continue;
      }
      const double w = Wt[2 * groups[t]], u = Wt[2 * groups[t] + 1];
      // ||n_t||^2 and ||a_t + b_t||^2 from the fp64 Gram: no fourth backward, no extra pass.
      // The Gram is exact to 2^-36 of the terms (precision.h), which keeps ||n_t|| to 1e-8
      // relative even at noise 1e-4 under b = -3a; accumulating ||n_t||^2 in the combine
      // pass instead would need a third pass to apply the scale.
      const double s = mmpareto_scale(t_aa[t], t_ab[t], t_bb[t], w, u, gamma);
      coefs[t] = {2 * s * w, 2 * s * u, kAB};
    }
    for_chunks(n_chunks, total, [&](int64_t b, int64_t e) {
      combine_chunks(refs.data(), coefs.data(), chunks.data(), b, e, false, partials.data());
    });
    reduce_partials(false, true);
  } else {
    for (size_t t = 0; t < n; ++t) {
      if (method == Method::kSum) {
        coefs[t] = {1.0, 1.0, kAB};
      } else if (!fusion.empty() && fusion[t]) {
        coefs[t] = {1.0, 0.0, kA};
      } else if (groups[t] >= 0) {
        coefs[t] = {0.0, alpha, kB};
      } else {
        coefs[t] = {1.0, alpha, kAB};
      }
    }
    // One pass: the Gram (for the statistics) rides along with the combine.
    for_chunks(n_chunks, total, [&](int64_t b, int64_t e) {
      combine_chunks(refs.data(), coefs.data(), chunks.data(), b, e, true, partials.data());
    });
    reduce_partials(true, true);
    group_sums();
    const double wm = method == Method::kSum ? 1.0 : 0.0, wu = method == Method::kSum ? 1.0 : alpha;
    for (int64_t g = 0; g < num_groups; ++g) {
      Wt[2 * g] = wm;
      Wt[2 * g + 1] = wu;
    }
  }

  double total_sq = 0;
  for (size_t t = 0; t < n; ++t) total_sq += t_sq[t];
  const double total_norm = std::sqrt(total_sq);
  const double clip = clip_in_place(refs, chunks, total, max_norm, total_norm);

  at::Tensor cos = at::empty({num_groups}, f64);
  at::Tensor conflict = at::empty({num_groups}, at::TensorOptions().dtype(at::kBool));
  for (int64_t g = 0; g < num_groups; ++g) {
    const double AA = G[3 * g], AB = G[3 * g + 1], BB = G[3 * g + 2];
    const double denom = std::sqrt(AA) * std::sqrt(BB);
    cos.data_ptr<double>()[g] = denom == 0 ? 0.0 : AB / denom;  // NaN propagates
    conflict.data_ptr<bool>()[g] = used[g] && !(AB > 0);
  }
  return {gram, cos, weights, conflict, at::scalar_tensor(total_norm, f64), at::scalar_tensor(clip, f64),
          at::scalar_tensor(all_finite, at::TensorOptions().dtype(at::kBool))};
}

}  // namespace mmfast::cpu

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { m.impl("combine_", &mmfast::cpu::combine_cpu); }
