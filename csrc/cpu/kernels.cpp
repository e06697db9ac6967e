// SIMD loops of the CPU backend. Every entry point is compiled three times
// (AVX-512, AVX2+FMA, baseline x86-64) and the loader picks the best clone the
// machine supports, so the wheel stays portable and still uses the wide units.
#include "kernels.h"

#include <algorithm>
#include <type_traits>

#include "vec.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MMFAST_NO_CLONES)
#define MMFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMFAST_CLONES
#endif

namespace mmfast::cpu {
namespace {

struct F64 {
  using T = double;
  using V = v8d;
  static constexpr int64_t W = 8;
  static MMFAST_INLINE V load(const T* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static MMFAST_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
};
template <class S>
struct Wide : S {
  using V = v16f;
  static constexpr int64_t W = 16;
};

// fp32 sums run over blocks this long, then move to fp64 (SEMANTICS.md, Precision).
constexpr int64_t kBlock = 1024;

template <class S>
MMFAST_INLINE typename S::V load_tail(const typename S::T* p, int64_t k) {
  typename S::T buf[S::W] = {};
  std::memcpy(buf, p, k * sizeof(typename S::T));
  return S::load(buf);
}
template <class S>
MMFAST_INLINE void store_tail(typename S::T* p, typename S::V v, int64_t k) {
  typename S::T buf[S::W];
  S::store(buf, v);
  std::memcpy(p, buf, k * sizeof(typename S::T));
}

template <class S>
MMFAST_INLINE bool all_zero(typename S::V z) {
  // z accumulates (x - x): 0 for finite x, NaN otherwise.
  bool ok = true;
  for (int64_t j = 0; j < S::W; ++j) ok &= (z[j] == 0);
  return ok;
}

template <class S>
MMFAST_INLINE void gram_range(const typename S::T* a, const typename S::T* b, int64_t n, Partial& p) {
  using V = typename S::V;
  constexpr int64_t W = S::W;
  double aa = 0, ab = 0, bb = 0;
  V z = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const typename S::T* pa = a + start;
    const typename S::T* pb = b + start;
    V saa = {}, sab = {}, sbb = {};
    int64_t i = 0;
    for (; i + W <= m; i += W) {
      const V x = S::load(pa + i), y = S::load(pb + i);
      saa += x * x;
      sab += x * y;
      sbb += y * y;
      z += (x - x) + (y - y);
    }
    if (i < m) {
      const V x = load_tail<S>(pa + i, m - i), y = load_tail<S>(pb + i, m - i);
      saa += x * x;
      sab += x * y;
      sbb += y * y;
      z += (x - x) + (y - y);
    }
    aa += hsum(saa);
    ab += hsum(sab);
    bb += hsum(sbb);
  }
  p.aa = aa;
  p.ab = ab;
  p.bb = bb;
  p.sq = 0;
  p.finite = all_zero<S>(z);
}

template <class S, Mode M, bool G>
MMFAST_INLINE void combine_range(const typename S::T* a, const typename S::T* b, typename S::T* o, int64_t n,
                                 double ca_, double cb_, Partial& p) {
  using V = typename S::V;
  using E = decltype(V{}[0]);
  constexpr int64_t W = S::W;
  constexpr bool kReadA = M != kB || G;
  constexpr bool kReadB = M != kA || G;
  const E ca = static_cast<E>(ca_), cb = static_cast<E>(cb_);
  double aa = 0, ab = 0, bb = 0, sq = 0;
  V z = {};
  auto step = [&](V x, V y, V& ssq, V& saa, V& sab, V& sbb) MMFAST_INLINE_LAMBDA {
    const V v = M == kAB ? ca * x + cb * y : (M == kA ? ca * x : cb * y);
    ssq += v * v;
    if constexpr (G) {
      saa += x * x;
      sab += x * y;
      sbb += y * y;
      z += (x - x) + (y - y);
    } else {
      if constexpr (kReadA) z += x - x;
      if constexpr (kReadB) z += y - y;
    }
    return v;
  };
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const typename S::T* pa = a + start;
    const typename S::T* pb = b + start;
    typename S::T* po = o + start;
    V ssq = {}, saa = {}, sab = {}, sbb = {};
    int64_t i = 0;
    for (; i + W <= m; i += W) {
      const V x = kReadA ? S::load(pa + i) : V{};
      const V y = kReadB ? S::load(pb + i) : V{};
      S::store(po + i, step(x, y, ssq, saa, sab, sbb));
    }
    if (i < m) {
      const V x = kReadA ? load_tail<S>(pa + i, m - i) : V{};
      const V y = kReadB ? load_tail<S>(pb + i, m - i) : V{};
      store_tail<S>(po + i, step(x, y, ssq, saa, sab, sbb), m - i);
    }
    sq += hsum(ssq);
    if constexpr (G) {
      aa += hsum(saa);
      ab += hsum(sab);
      bb += hsum(sbb);
    }
  }
  p.aa = aa;
  p.ab = ab;
  p.bb = bb;
  p.sq = sq;
  p.finite = all_zero<S>(z);
}

template <class S>
MMFAST_INLINE void scale_range(typename S::T* o, int64_t n, double coef_) {
  using V = typename S::V;
  using E = decltype(V{}[0]);
  constexpr int64_t W = S::W;
  const E coef = static_cast<E>(coef_);
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(o + i, S::load(o + i) * coef);
  if (i < n) store_tail<S>(o + i, load_tail<S>(o + i, n - i) * coef, n - i);
}

// Calls fn with the storage type of a dtype.
template <class Fn>
MMFAST_INLINE void with_storage(Dtype d, Fn&& fn) {
  switch (d) {
    case kF32: fn(Wide<F32>{}); break;
    case kF64: fn(F64{}); break;
    case kBF16: fn(Wide<BF16>{}); break;
    case kF16: fn(Wide<F16>{}); break;
  }
}

}  // namespace

MMFAST_CLONES void gram_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end,
                               Partial* partials) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const TensorRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      using S = decltype(s);
      using T = typename S::T;
      gram_range<S>(static_cast<const T*>(t.a) + ch.begin, static_cast<const T*>(t.b) + ch.begin, ch.n, partials[c]);
    });
  }
}

MMFAST_CLONES void combine_chunks(const TensorRef* tensors, const Coef* coefs, const Chunk* chunks, int64_t begin,
                                  int64_t end, bool with_gram, Partial* partials) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const TensorRef& t = tensors[ch.tensor];
    const Coef& k = coefs[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      using S = decltype(s);
      using T = typename S::T;
      const T* a = static_cast<const T*>(t.a) + ch.begin;
      const T* b = static_cast<const T*>(t.b) + ch.begin;
      T* o = static_cast<T*>(t.out) + ch.begin;
      Partial& p = partials[c];
      auto run = [&](auto mode, auto gram) MMFAST_INLINE_LAMBDA {
        combine_range<S, decltype(mode)::value, decltype(gram)::value>(a, b, o, ch.n, k.ca, k.cb, p);
      };
      using kG = std::true_type;
      using kNoG = std::false_type;
      using AB = std::integral_constant<Mode, kAB>;
      using A = std::integral_constant<Mode, kA>;
      using B = std::integral_constant<Mode, kB>;
      switch (k.mode) {
        case kAB: with_gram ? run(AB{}, kG{}) : run(AB{}, kNoG{}); break;
        case kA: with_gram ? run(A{}, kG{}) : run(A{}, kNoG{}); break;
        case kB: with_gram ? run(B{}, kG{}) : run(B{}, kNoG{}); break;
      }
    });
  }
}

MMFAST_CLONES void scale_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end,
                                double coef) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const TensorRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      using S = decltype(s);
      scale_range<S>(static_cast<typename S::T*>(t.out) + ch.begin, ch.n, coef);
    });
  }
}

namespace {

// K-objective Gram: every pair (p, q <= p) in one read of the K inputs.
template <class S, int K>
MMFAST_INLINE void gram_k_range(const MultiRef& t, int k_rt, int64_t begin, int64_t n, double* out, bool& finite) {
  using V = typename S::V;
  using T = typename S::T;
  constexpr int64_t W = S::W;
  constexpr int KM = K > 0 ? K : kMaxObjectives;
  const int k = K > 0 ? K : k_rt;
  const T* in[KM];
  for (int j = 0; j < k; ++j) in[j] = static_cast<const T*>(t.in[j]) + begin;
  double d[KM * KM] = {};
  V z = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    V acc[KM * (KM + 1) / 2] = {};
    auto step = [&](int64_t i, int64_t len) MMFAST_INLINE_LAMBDA {
      V x[KM];
      for (int j = 0; j < k; ++j) {
        x[j] = len == W ? S::load(in[j] + start + i) : load_tail<S>(in[j] + start + i, len);
        z += x[j] - x[j];
      }
      int idx = 0;
      for (int p = 0; p < k; ++p)
        for (int q = 0; q <= p; ++q) acc[idx++] += x[p] * x[q];
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) step(i, W);
    if (i < m) step(i, m - i);
    int idx = 0;
    for (int p = 0; p < k; ++p)
      for (int q = 0; q <= p; ++q) d[p * KM + q] += hsum(acc[idx++]);
  }
  // Lower triangle, then the mirror: as one chained assignment GCC 12 mis-vectorised
  // the K = 4 case (the test of every K caught it).
  for (int p = 0; p < k; ++p)
    for (int q = 0; q <= p; ++q) out[p * k + q] = d[p * KM + q];
  for (int p = 0; p < k; ++p)
    for (int q = 0; q < p; ++q) out[q * k + p] = out[p * k + q];
  finite = all_zero<S>(z);
}

template <class S, int K>
MMFAST_INLINE void combine_k_range(const MultiRef& t, int k_rt, const double* c, int64_t begin, int64_t n,
                                   double& sq_out) {
  using V = typename S::V;
  using T = typename S::T;
  using E = decltype(V{}[0]);
  constexpr int64_t W = S::W;
  constexpr int KM = K > 0 ? K : kMaxObjectives;
  const int k = K > 0 ? K : k_rt;
  const T* in[KM];
  E coef[KM];
  for (int j = 0; j < k; ++j) {
    in[j] = static_cast<const T*>(t.in[j]) + begin;
    coef[j] = static_cast<E>(c[j]);
  }
  T* o = static_cast<T*>(t.out) + begin;
  double sq = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    V ssq = {};
    auto step = [&](int64_t i, int64_t len) MMFAST_INLINE_LAMBDA {
      V v = {};
      for (int j = 0; j < k; ++j) v += coef[j] * (len == W ? S::load(in[j] + start + i) : load_tail<S>(in[j] + start + i, len));
      ssq += v * v;
      if (len == W) S::store(o + start + i, v);
      else store_tail<S>(o + start + i, v, len);
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) step(i, W);
    if (i < m) step(i, m - i);
    sq += hsum(ssq);
  }
  sq_out = sq;
}

// Calls fn with K as a compile-time constant for 2..8 (unrolled registers), 0 (runtime K) above.
template <class Fn>
MMFAST_INLINE void with_k(int k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace

MMFAST_CLONES void gram_k_chunks(const MultiRef* tensors, int K, const Chunk* chunks, int64_t begin, int64_t end,
                                 double* partials, bool* finite) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const MultiRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      with_k(K, [&](auto kc) MMFAST_INLINE_LAMBDA {
        gram_k_range<decltype(s), decltype(kc)::value>(t, K, ch.begin, ch.n, partials + c * K * K, finite[c]);
      });
    });
  }
}

MMFAST_CLONES void combine_k_chunks(const MultiRef* tensors, int K, const double* coefs, const Chunk* chunks,
                                    int64_t begin, int64_t end, double* sq) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk& ch = chunks[c];
    const MultiRef& t = tensors[ch.tensor];
    with_storage(t.dtype, [&](auto s) MMFAST_INLINE_LAMBDA {
      with_k(K, [&](auto kc) MMFAST_INLINE_LAMBDA {
        combine_k_range<decltype(s), decltype(kc)::value>(t, K, coefs + ch.tensor * K, ch.begin, ch.n, sq[c]);
      });
    });
  }
}

const char* simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MMFAST_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4)";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2 (x86-64-v3)";
  return "sse2 (x86-64 baseline)";
#else
  return "generic (compiler vector extensions)";
#endif
}

}  // namespace mmfast::cpu
