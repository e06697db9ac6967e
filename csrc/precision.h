// Precision rules shared by the CPU and CUDA kernels. The derivation of the zero rule
// is written once, in mmfast/reference.py (ZERO_TOL); the values here must equal the
// Python ones (tests/test_precision.py checks them through mmfast._C.constants()).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MMFAST_HD __host__ __device__ __forceinline__
#else
#define MMFAST_HD inline
#endif

namespace mmfast {

// Elements per chunk, the unit of parallel work: partial sums are kept per chunk and
// added per tensor in chunk order, so results do not depend on the thread count.
constexpr int64_t kChunk = int64_t{1} << 15;

// ||n_t||^2 <= kZeroTol * 4 (w sqrt(aa) + v sqrt(bb))^2 means n_t = 0 up to the rounding
// of its fp64 terms (2^17 unit roundoffs of fp64; mmfast/reference.py, ZERO_TOL).
constexpr double kZeroTol = 0x1p-36;

// The MMPareto scale s_t (g_t = s_t n_t) from the per-tensor fp64 Gram terms and the
// group's weights (w, v = 1 - w): gamma max(||a+b|| / ||n||, 1), or 0 where n_t is zero.
// NaN propagates: no comparison below drops it (a NaN ratio stays NaN through the max).
MMFAST_HD double mmpareto_scale(double aa, double ab, double bb, double w, double v, double gamma) {
  const double nn = 4 * (w * w * aa + 2 * w * v * ab + v * v * bb);
  const double ss = aa + 2 * ab + bb;
  const double root = w * sqrt(aa) + v * sqrt(bb);
  const double terms = 4 * root * root;
  if (terms <= 1.7976931348623157e308 && nn <= kZeroTol * terms) return 0.0;  // finite terms only
  const double ratio = sqrt(ss < 0 ? 0.0 : ss) / sqrt(nn < 0 ? 0.0 : nn);  // NaN < 0 is false: NaN stays
  return gamma * (ratio < 1.0 ? 1.0 : ratio);
}

// clip_grad_norm_'s coefficient, min(1, max_norm / (total + 1e-6)), keeping a NaN.
MMFAST_HD double clip_coefficient(double max_norm, double total_norm) {
  const double c = max_norm / (total_norm + 1e-6);
  return c > 1.0 ? 1.0 : c;  // NaN > 1 is false: NaN stays
}

}  // namespace mmfast
