// SIMD loops of the CPU backend, K objectives: one build per instruction set (isa.h,
// which includes this file once for each; no include guard). kernels_multi.cpp dispatches.
#include "kernels_impl.h"

namespace mmfast::cpu::MMFAST_ISA {
namespace {

// K-objective Gram: every pair (p, q <= p) in one read of the K inputs, products and sums
// in fp64 lanes (as the two-objective Gram, kernels_loops.h).
template <class S, int K>
MMFAST_INLINE void gram_k_range(const MultiRef& t, int k_rt, int64_t begin, int64_t n, double* out, bool& finite) {
  using V = typename S::V;
  using T = typename S::T;
  constexpr int64_t W = S::W;
  constexpr int P = S::P;
  constexpr int KM = K > 0 ? K : kMaxObjectives;
  const int k = K > 0 ? K : k_rt;
  const T* in[KM];
  for (int j = 0; j < k; ++j) in[j] = static_cast<const T*>(t.in[j]) + begin;
  double d[KM * KM] = {};
  V z = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    // Runtime K (above 8): zero only the k (k + 1) / 2 pairs in use (KM = 32 is 528).
    v8d acc[KM * (KM + 1) / 2][P];
    for (int j = 0; j < k * (k + 1) / 2; ++j)
      for (int r = 0; r < P; ++r) acc[j][r] = v8d{};
    auto step = [&](int64_t i, int64_t len) MMFAST_INLINE_LAMBDA {
      v8d x[KM][P];
      for (int j = 0; j < k; ++j) {
        const V v = len == W ? S::load(in[j] + start + i) : load_tail<S>(in[j] + start + i, len);
        if constexpr (kCheckEach<S>) z += v - v;
        widen(v, x[j]);
      }
      int idx = 0;
      for (int p = 0; p < k; ++p)
        for (int q = 0; q <= p; ++q, ++idx)
          for (int r = 0; r < P; ++r) acc[idx][r] += x[p][r] * x[q][r];
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) step(i, W);
    if (i < m) step(i, m - i);
    int idx = 0;
    for (int p = 0; p < k; ++p)
      for (int q = 0; q <= p; ++q) d[p * KM + q] += hsum<P>(acc[idx++]);
  }
  // Lower triangle, then the mirror: as one chained assignment GCC 12 mis-vectorised
  // the K = 4 case (the test of every K caught it).
  for (int p = 0; p < k; ++p)
    for (int q = 0; q <= p; ++q) out[p * k + q] = d[p * KM + q];
  for (int p = 0; p < k; ++p)
    for (int q = 0; q < p; ++q) out[q * k + p] = out[p * k + q];
  if constexpr (kCheckEach<S>) {
    finite = all_zero<S>(z);
  } else {  // the diagonal <g_p, g_p> is non-finite exactly when a value in it is (kernels_impl.h)
    finite = true;
    for (int p = 0; p < k; ++p) finite &= std::isfinite(d[p * KM + p]);
  }
}

// out = sum_k c_k in_k in fp64 with fp64 coefficients, rounded once; <out,out> in fp64.
template <class S, int K>
MMFAST_INLINE void combine_k_range(const MultiRef& t, int k_rt, const double* c, int64_t begin, int64_t n,
                                   double& sq_out) {
  using V = typename S::V;
  using T = typename S::T;
  constexpr int64_t W = S::W;
  constexpr int P = S::P;
  constexpr int KM = K > 0 ? K : kMaxObjectives;
  const int k = K > 0 ? K : k_rt;
  const T* in[KM];
  double coef[KM];
  for (int j = 0; j < k; ++j) {
    in[j] = static_cast<const T*>(t.in[j]) + begin;
    coef[j] = c[j];
  }
  T* o = static_cast<T*>(t.out) + begin;
  double sq = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    v8d ssq[P] = {};
    auto step = [&](int64_t i, int64_t len) MMFAST_INLINE_LAMBDA {
      v8d v[P] = {};
      for (int j = 0; j < k; ++j) {
        v8d x[P];
        widen(len == W ? S::load(in[j] + start + i) : load_tail<S>(in[j] + start + i, len), x);
        for (int r = 0; r < P; ++r) v[r] += coef[j] * x[r];
      }
      for (int r = 0; r < P; ++r) ssq[r] += v[r] * v[r];
      V out;
      narrow(v, out);
      if (len == W) S::store(o + start + i, out);
      else store_tail<S>(o + start + i, out, len);
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) step(i, W);
    if (i < m) step(i, m - i);
    sq += hsum<P>(ssq);
  }
  sq_out = sq;
}

// Calls fn with K as a compile-time constant for 1..8 (unrolled registers), 0 (runtime K)
// above. Only where it pays: the AVX2 and AVX-512 builds, for fp32/bf16/fp16 storage. The
// baseline build and fp64 gradients take the runtime-K loop at every K (same results): each
// unrolled K costs compile time (about 20 s of -O3 per K, build and dtype).
template <class S, class Fn>
MMFAST_INLINE void with_k(int k, Fn&& fn) {
#if MMFAST_AVX512 || MMFAST_AVX2
  if constexpr (!kCheckEach<S>) {
    switch (k) {
      case 1: return fn(std::integral_constant<int, 1>{});
      case 2: return fn(std::integral_constant<int, 2>{});
      case 3: return fn(std::integral_constant<int, 3>{});
      case 4: return fn(std::integral_constant<int, 4>{});
      case 5: return fn(std::integral_constant<int, 5>{});
      case 6: return fn(std::integral_constant<int, 6>{});
      case 7: return fn(std::integral_constant<int, 7>{});
      case 8: return fn(std::integral_constant<int, 8>{});
      default: break;
    }
  }
#endif
  fn(std::integral_constant<int, 0>{});
}

}  // namespace

void gram_k_chunks(const MultiRef* tensors, int K, const Chunk* chunks, int64_t begin, int64_t end,
                                 double* partials, bool* finite) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const MultiRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      with_k<decltype(s)>(K, [&](auto kc) MMFAST_INLINE_LAMBDA {
        gram_k_range<decltype(s), decltype(kc)::value>(t, K, ch.begin, ch.n, partials + c * K * K, finite[c]);
      });
    });
  }
}

void combine_k_chunks(const MultiRef* tensors, int K, const double* coefs, const Chunk* chunks,
                                    int64_t begin, int64_t end, double* sq) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const MultiRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      with_k<decltype(s)>(K, [&](auto kc) MMFAST_INLINE_LAMBDA {
        combine_k_range<decltype(s), decltype(kc)::value>(t, K, coefs + ch.tensor * K, ch.begin, ch.n, sq[c]);
      });
    });
  }
}

}  // namespace mmfast::cpu::MMFAST_ISA
