// mmfast::clip_ on CPU tensors: total L2 norm of a tensor list (per group too) in
// one read, then a rescale pass only when the norm exceeds max_norm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common.h"

namespace mmfast::cpu {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_cpu(at::TensorList grads, at::IntArrayRef groups,
                                                                    std::optional<double> max_norm) {
  check_scalars(1.0, 0.0, max_norm);
  // Checked and tabled once per layout: grads read as a and b (the second load hits L1).
  const auto lay = cpu_layout(kOpClip, {{"grads", grads, true}}, groups, {}, 0, 0, 0);
  const size_t n = lay->refs.size();
  const int64_t n_chunks = static_cast<int64_t>(lay->chunks.size());
  std::vector<Partial> partials(n_chunks);
  for_chunks(n_chunks, lay->total,
             [&](int64_t b, int64_t e) { gram_chunks(lay->refs.data(), lay->chunks.data(), b, e, partials.data()); });
  const int64_t num_groups = lay->num_groups;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor group_sq = at::zeros({num_groups}, f64);
  double* G = group_sq.data_ptr<double>();
  std::vector<double> t_sq(n, 0.0);
  bool all_finite = true;
  for (int64_t c = 0; c < n_chunks; ++c) {
    t_sq[lay->chunks[c].tensor] += partials[c].aa;
    all_finite &= partials[c].finite;
  }
  double total_sq = 0;
  for (size_t t = 0; t < n; ++t) {
    total_sq += t_sq[t];
    if (lay->groups[t] >= 0) G[lay->groups[t]] += t_sq[t];
  }
  const double total_norm = std::sqrt(total_sq);
  const double clip = clip_in_place(lay->refs, lay->chunks, lay->total, max_norm, total_norm);
  return {group_sq, at::scalar_tensor(total_norm, f64), at::scalar_tensor(clip, f64),
          at::scalar_tensor(all_finite, at::TensorOptions().dtype(at::kBool))};
}

}  // namespace mmfast::cpu

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { m.impl("clip_", &mmfast::cpu::clip_cpu); }
