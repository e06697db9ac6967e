// K objectives on CPU tensors: mmfast::gram_k (per-tensor K x K Gram in one read of
// the K gradients) and mmfast::combine_k_ (out = sum_k c_tk g_tk in one more read).
// mmfast::aggregate_k_ fuses the two around the weighting step (weightings.cpp) in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../weighting_args.h"
#include "common.h"
#include "kernels_multi.h"
#include "weightings.h"

namespace mmfast::cpu {
namespace {

struct Plan {
  std::vector<MultiRef> refs;
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

// grads is tensor-major: grads[t * K + k] is objective k's gradient of tensor t.
Plan plan(const char* op, at::TensorList grads, int64_t K, at::TensorList out) {
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxObjectives, op, ": K: expected 1..", kMaxObjectives, " objectives, got ", K);
  TORCH_CHECK_VALUE(!grads.empty() && grads.size() % K == 0, op, ": grads: expected a positive multiple of K = ", K,
                    " tensors, got ", grads.size());
  const size_t T = grads.size() / K;
  TORCH_CHECK_VALUE(out.empty() || out.size() == T, op, ": out: expected ", T, " tensors, got ", out.size());
  Plan p;
  p.refs.resize(T);
  for (size_t t = 0; t < T; ++t) {
    const at::Tensor& like = out.empty() ? grads[t * K] : out[t];
    MultiRef& r = p.refs[t];
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& g = grads[t * K + k];
      // mmfast.aggregate_ checks its arguments (check_args) before calling; this guards
      // direct calls against touching memory that is not there.
      TORCH_CHECK_VALUE(g.device().is_cpu() && g.scalar_type() == like.scalar_type() && g.sizes() == like.sizes() &&
                            g.is_contiguous(),
                        op, ": grads[", t * K + k, "]: expected a contiguous CPU tensor like ", out.empty() ? "grads" : "out",
                        "[", t, "]");
      r.in[k] = g.const_data_ptr();
    }
    TORCH_CHECK_VALUE(like.device().is_cpu() && like.is_contiguous(), op, ": out[", t, "]: expected a contiguous CPU tensor");
    TORCH_CHECK_TYPE(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble ||
                         like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16,
                     op, ": expected a floating dtype, got ", like.scalar_type());
    r.out = out.empty() ? nullptr : out[t].data_ptr();
    r.dtype = dtype_code(like.scalar_type());
    add_chunks(p.chunks, static_cast<int64_t>(t), like.numel());
    p.total += like.numel() * K;
  }
  return p;
}

}  // namespace

namespace {

// The Gram pass: per [T, K, K] (zeroed here), returns all_finite.
bool gram_pass(const Plan& p, int64_t K, double* G) {
  const int64_t C = static_cast<int64_t>(p.chunks.size()), T = static_cast<int64_t>(p.refs.size());
  std::vector<double> partial(std::max<int64_t>(C, 1) * K * K, 0.0);
  std::unique_ptr<bool[]> finite(new bool[std::max<int64_t>(C, 1)]);
  for_chunks(C, p.total, [&](int64_t b, int64_t e) {
    gram_k_chunks(p.refs.data(), static_cast<int>(K), p.chunks.data(), b, e, partial.data(), finite.get());
  });
  std::fill(G, G + T * K * K, 0.0);
  bool all_finite = true;
  for (int64_t c = 0; c < C; ++c) {  // chunk order: deterministic
    double* g = G + p.chunks[c].tensor * K * K;
    for (int64_t j = 0; j < K * K; ++j) g[j] += partial[c * K * K + j];
    all_finite &= finite[c];
  }
  return all_finite;
}

// The combine pass: out_t = sum_k coefs[t, k] g_tk; per-tensor <out_t, out_t> into sq [T].
void combine_pass(const Plan& p, int64_t K, const double* coefs, double* s) {
  const int64_t C = static_cast<int64_t>(p.chunks.size()), T = static_cast<int64_t>(p.refs.size());
  std::vector<double> sq(std::max<int64_t>(C, 1), 0.0);
  for_chunks(C, p.total, [&](int64_t b, int64_t e) {
    combine_k_chunks(p.refs.data(), static_cast<int>(K), coefs, p.chunks.data(), b, e, sq.data());
  });
  std::fill(s, s + T, 0.0);
  for (int64_t ch = 0; ch < C; ++ch) s[p.chunks[ch].tensor] += sq[ch];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gram_k_cpu(at::TensorList grads, int64_t K) {
  Plan p = plan("mmfast::gram_k", grads, K, {});
  const int64_t T = static_cast<int64_t>(p.refs.size());
  at::Tensor per_tensor = at::empty({T, K, K}, at::kDouble);
  const bool all_finite = gram_pass(p, K, per_tensor.data_ptr<double>());
  return {per_tensor, at::scalar_tensor(all_finite, at::kBool)};
}

// aggregate_ in one call: the Gram pass (or the given per-tensor Grams: the sharded
// path's all-reduced ones), the weighting step, the combine pass and the total norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_k_cpu(
    at::TensorList out, at::TensorList grads, int64_t K, const std::optional<at::Tensor>& per_tensor,
    const at::Tensor& layout, int64_t num_groups, const std::string& method, double c, double norm_eps,
    int64_t rescale, double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps,
    std::optional<double> gamma) {
  const char* op = "mmfast::aggregate_k_";
  const solve::Params prm = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  Plan p = plan(op, grads, K, out);
  const int64_t T = static_cast<int64_t>(p.refs.size()), G = num_groups;
  at::Tensor per;
  bool all_finite = true;
  if (per_tensor) {
    per = per_tensor->contiguous();
    TORCH_CHECK_VALUE(per.device().is_cpu() && per.scalar_type() == at::kDouble && per.dim() == 3 &&
                          per.size(0) == T && per.size(1) == K && per.size(2) == K,
                      op, ": per_tensor: expected a float64 CPU tensor [", T, ", ", K, ", ", K, "], got ",
                      per.scalar_type(), " ", per.sizes());
    const double* d = per.const_data_ptr<double>();
    for (int64_t i = 0; i < T * K * K; ++i) all_finite &= solve::is_finite(d[i]);
  } else {
    per = at::empty({T, K, K}, at::kDouble);
    all_finite = gram_pass(p, K, per.data_ptr<double>());
  }
  check_layout(op, per, layout, G);
  TORCH_CHECK_VALUE(layout.device().is_cpu(), op, ": layout: expected a CPU tensor");
  at::Tensor gram = at::empty({G, K, K}, at::kDouble), w = at::empty({G, K}, at::kDouble);
  std::vector<double> coefs(std::max<int64_t>(T * K, 1)), sq(std::max<int64_t>(T, 1));
  aggregate_weights_into(per.const_data_ptr<double>(), T, K, layout.const_data_ptr<int64_t>(), G, prm, gamma,
                         gram.data_ptr<double>(), w.data_ptr<double>(), coefs.data());
  combine_pass(p, K, coefs.data(), sq.data());
  double total = 0;
  for (int64_t t = 0; t < T; ++t) total += sq[t];
  return {gram, w, at::scalar_tensor(std::sqrt(total), at::kDouble), at::scalar_tensor(all_finite, at::kBool)};
}

at::Tensor combine_k_cpu(at::TensorList out, at::TensorList grads, int64_t K, const at::Tensor& coefs) {
  Plan p = plan("mmfast::combine_k_", grads, K, out);
  const int64_t T = static_cast<int64_t>(p.refs.size());
  TORCH_CHECK_VALUE(coefs.device().is_cpu() && coefs.scalar_type() == at::kDouble && coefs.dim() == 2 &&
                        coefs.size(0) == T && coefs.size(1) == K,
                    "mmfast::combine_k_: coefs: expected a float64 CPU tensor of shape [", T, ", ", K, "], got ",
                    coefs.scalar_type(), " ", coefs.sizes());
  at::Tensor c = coefs.contiguous();
  at::Tensor per_tensor = at::empty({T}, at::kDouble);
  combine_pass(p, K, c.const_data_ptr<double>(), per_tensor.data_ptr<double>());
  return per_tensor;
}

}  // namespace mmfast::cpu

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("gram_k", &mmfast::cpu::gram_k_cpu);
  m.impl("combine_k_", &mmfast::cpu::combine_k_cpu);
  m.impl("aggregate_k_", &mmfast::cpu::aggregate_k_cpu);
}
