// The K x K weightings on the CPU: mmfast::weighting (a batch of Gram matrices) and
// mmfast::aggregate_weights (aggregate_'s step between its two passes: group sums of the
// per-tensor Grams, the weighting, the per-tensor coefficients of the combine). The
// solvers are csrc/solvers.h, shared with the CUDA backend.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../precision.h"
#include "../weighting_args.h"
#include "weightings.h"

namespace mmfast::cpu {
namespace {

// Groups per parallel task: each solve is a few microseconds at most.
constexpr int64_t kGroupsPerTask = 16;

template <class Fn>
void for_groups(int64_t n, const Fn& fn) {
  if (n <= kGroupsPerTask) {
    fn(0, n);
  } else {
    at::parallel_for(0, n, kGroupsPerTask, fn);
  }
}

at::Tensor weighting_cpu(const at::Tensor& G, const std::string& method, double c, double norm_eps, int64_t rescale,
                         double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps) {
  const char* op = "mmfast::weighting";
  check_gram(op, G);
  TORCH_CHECK_VALUE(G.device().is_cpu(), op, ": G: expected a CPU tensor, got one on ", G.device());
  const int64_t B = G.size(0), K = G.size(1);
  const solve::Params p = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  at::Tensor G64 = G.to(at::kDouble).contiguous();
  at::Tensor w = at::empty({B, K}, G64.options());
  const double* g = G64.const_data_ptr<double>();
  double* out = w.data_ptr<double>();
  for_groups(B, [&](int64_t b, int64_t e) {
    double ws[solve::workspace(solve::kMaxK)];
    for (int64_t i = b; i < e; ++i) solve::weigh(g + i * K * K, p, out + i * K, ws);
  });
  return G.scalar_type() == at::kDouble ? w : w.to(G.scalar_type());
}

}  // namespace

void aggregate_weights_into(const double* per, int64_t T, int64_t K, const int64_t* ids, int64_t G,
                            const solve::Params& p, std::optional<double> gamma, double* gs, double* w, double* cf) {
  const char* op = "mmfast::aggregate_weights";
  const int64_t KK = K * K;
  const int64_t* first = ids + T;
  const int64_t* order = first + G + 2;
  TORCH_CHECK_VALUE(first[0] == 0 && first[G + 1] == T, op, ": layout: bad offsets");
  for (int64_t i = 0; i < G * KK; ++i) gs[i] = 0;
  for (int64_t g = 0; g <= G; ++g) {  // group sums in tensor order: deterministic
    TORCH_CHECK_VALUE(first[g] <= first[g + 1], op, ": layout: bad offsets");
    for (int64_t i = first[g]; i < first[g + 1]; ++i) {
      const int64_t t = order[i];
      TORCH_CHECK_VALUE(t >= 0 && t < T && ids[t] == (g == G ? -1 : g), op, ": layout: bad entry ", i);
      if (g < G)
        for (int64_t j = 0; j < KK; ++j) gs[g * KK + j] += per[t * KK + j];
    }
  }
  for_groups(G, [&](int64_t b, int64_t e) {
    double ws[solve::workspace(solve::kMaxK)];
    for (int64_t g = b; g < e; ++g) solve::weigh(gs + g * KK, p, w + g * K, ws);
  });
  const bool rescaled = gamma.has_value() && p.method == solve::kMmpareto;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t g = ids[t];
    double* ct = cf + t * K;
    if (g < 0) {
      for (int64_t k = 0; k < K; ++k) ct[k] = 1.0;
      continue;
    }
    const double* wt = w + g * K;
    const double s = rescaled ? solve::mmpareto_scale_k(per + t * KK, wt, static_cast<int>(K), *gamma) : 1.0;
    for (int64_t k = 0; k < K; ++k) ct[k] = wt[k] * s;
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_weights_cpu(
    const at::Tensor& per_tensor, const at::Tensor& layout, int64_t num_groups, const std::string& method, double c,
    double norm_eps, int64_t rescale, double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps,
    std::optional<double> gamma) {
  const char* op = "mmfast::aggregate_weights";
  check_layout(op, per_tensor, layout, num_groups);
  TORCH_CHECK_VALUE(per_tensor.device().is_cpu(), op, ": per_tensor: expected a CPU tensor");
  const int64_t T = per_tensor.size(0), K = per_tensor.size(1), G = num_groups;
  const solve::Params p = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  at::Tensor gram = at::empty({G, K, K}, per_tensor.options());
  at::Tensor w = at::empty({G, K}, per_tensor.options());
  at::Tensor coefs = at::empty({T, K}, per_tensor.options());
  aggregate_weights_into(per_tensor.const_data_ptr<double>(), T, K, layout.const_data_ptr<int64_t>(), G, p, gamma,
                         gram.data_ptr<double>(), w.data_ptr<double>(), coefs.data_ptr<double>());
  return {gram, w, coefs};
}

}  // namespace
}  // namespace mmfast::cpu

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("weighting", &mmfast::cpu::weighting_cpu);
  m.impl("aggregate_weights", &mmfast::cpu::aggregate_weights_cpu);
}
