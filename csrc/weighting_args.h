// The host side of the weighting operators (mmfast::weighting, mmfast::aggregate_weights):
// their argument checks and the solver's parameters, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <string>

#include "solvers.h"

namespace mmfast {

inline solve::Method method_code(const std::string& m, const char* op) {
  if (m == "mgda") return solve::kMgda;
  if (m == "pcgrad") return solve::kPcgrad;
  if (m == "cagrad") return solve::kCagrad;
  if (m == "imtlg") return solve::kImtlg;
  if (m == "upgrad") return solve::kUpgrad;
  if (m == "mmpareto") return solve::kMmpareto;
  TORCH_CHECK_VALUE(false, op, ": weighting: unknown '", m, "'; known: cagrad, imtlg, mgda, mmpareto, pcgrad, upgrad");
}

// The rounding unit of a dtype (2^-53 for float64, 2^-24 for float32, ...): rank cutoffs.
inline double rounding_unit(c10::ScalarType s) {
  switch (s) {
    case at::kFloat: return 0x1p-24;
    case at::kHalf: return 0x1p-11;
    case at::kBFloat16: return 0x1p-8;
    default: return 0x1p-53;
  }
}

// orders: K rows of K entries (pcgrad's projection order; -1 pads a shorter row), or empty.
inline solve::Params make_params(const char* op, int64_t K, const std::string& method, double c, double norm_eps,
                                 int64_t rescale, double reg_eps, double rcond, int64_t main, at::IntArrayRef orders,
                                 double eps) {
  TORCH_CHECK_VALUE(K >= 1 && K <= solve::kMaxK, op, ": K: expected 1..", solve::kMaxK, " objectives, got ", K);
  solve::Params p;
  p.method = method_code(method, op);
  p.K = static_cast<int32_t>(K);
  TORCH_CHECK_VALUE(eps > 0 && eps < 1, op, ": eps: expected a rounding unit in (0, 1), got ", eps);
  p.eps = eps;
  TORCH_CHECK_VALUE(std::isfinite(c) && c >= 0, op, ": c: expected >= 0, got ", c);
  TORCH_CHECK_VALUE(std::isfinite(norm_eps) && norm_eps >= 0, op, ": norm_eps: expected >= 0, got ", norm_eps);
  TORCH_CHECK_VALUE(rescale >= 0 && rescale <= 2, op, ": rescale: expected 0, 1 or 2, got ", rescale);
  TORCH_CHECK_VALUE(std::isfinite(reg_eps) && reg_eps >= 0, op, ": reg_eps: expected >= 0, got ", reg_eps);
  TORCH_CHECK_VALUE(std::isfinite(rcond), op, ": rcond: expected a finite number (< 0: the default), got ", rcond);
  TORCH_CHECK_VALUE(main >= 0 && main < K, op, ": main: expected an objective index in [0, ", K, "), got ", main);
  p.c = c;
  p.norm_eps = norm_eps;
  p.rescale = static_cast<int32_t>(rescale);
  p.reg_eps = reg_eps;
  p.rcond = rcond;
  p.main = static_cast<int32_t>(main);
  std::memset(p.orders, -1, sizeof p.orders);
  if (p.method == solve::kPcgrad) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(orders.size()) == K * K, op, ": orders: expected K * K = ", K * K,
                      " entries, got ", orders.size());
    for (int64_t i = 0; i < K; ++i)
      for (int64_t s = 0; s < K; ++s) {
        const int64_t j = orders[i * K + s];
        TORCH_CHECK_VALUE(j >= -1 && j < K, op, ": orders[", i, "][", s, "]: expected -1..", K - 1, ", got ", j);
        p.orders[i * solve::kMaxK + s] = static_cast<int8_t>(j);
      }
  }
  return p;
}

inline void check_gram(const char* op, const at::Tensor& G) {
  TORCH_CHECK_VALUE(G.dim() == 3 && G.size(1) == G.size(2), op, ": G: expected a [B, K, K] Gram matrix, got shape ",
                    G.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(G.scalar_type()), op, ": G: expected a floating dtype, got ", G.scalar_type());
}

// The layout of aggregate_weights: ids [T] (group of each tensor, -1 outside), first [G + 2]
// (offsets into order; group G holds the tensors outside every group), order [T]
// (tensors by group, in tensor order within a group): one int64 tensor [T + G + 2 + T].
struct LayoutView {
  const int64_t* ids;
  const int64_t* first;
  const int64_t* order;
};

inline void check_layout(const char* op, const at::Tensor& per_tensor, const at::Tensor& layout, int64_t G) {
  TORCH_CHECK_VALUE(per_tensor.dim() == 3 && per_tensor.size(1) == per_tensor.size(2) &&
                        per_tensor.scalar_type() == at::kDouble && per_tensor.is_contiguous(),
                    op, ": per_tensor: expected a contiguous float64 [T, K, K] tensor, got ", per_tensor.scalar_type(),
                    " ", per_tensor.sizes());
  const int64_t T = per_tensor.size(0);
  TORCH_CHECK_VALUE(G >= 0, op, ": num_groups: expected >= 0, got ", G);
  TORCH_CHECK_VALUE(layout.dim() == 1 && layout.scalar_type() == at::kLong && layout.is_contiguous() &&
                        layout.numel() == 2 * T + G + 2 && layout.device() == per_tensor.device(),
                    op, ": layout: expected a contiguous int64 tensor of ", 2 * T + G + 2, " entries on ",
                    per_tensor.device(), " (mmfast._multi builds it)");
}

}  // namespace mmfast
