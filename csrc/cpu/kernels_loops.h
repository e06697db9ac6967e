// SIMD loops of the CPU backend, two objectives: one build per instruction set (isa.h,
// which includes this file once for each; no include guard). kernels.cpp dispatches.
#include "kernels_impl.h"

namespace mmfast::cpu::MMFAST_ISA {
namespace {

// Products and sums in fp64 lanes (docs/semantics.md, Precision: fp32 products are exact
// in fp64). Whether every value read was finite: for fp32/bf16/fp16 storage, exactly when
// <a,a> and <b,b> are (a square is at most 1.2e77, so no finite sum of fewer than 2^31 of
// them overflows fp64), which saves a check per vector; fp64 storage keeps the check.
template <class S>
MMFAST_INLINE void gram_range(const typename S::T* a, const typename S::T* b, int64_t n, Partial& p) {
  using V = typename S::V;
  constexpr int64_t W = S::W;
  constexpr int P = S::P;
  double aa = 0, ab = 0, bb = 0;
  V z = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const typename S::T* pa = a + start;
    const typename S::T* pb = b + start;
    v8d saa[P] = {}, sab[P] = {}, sbb[P] = {};
    auto step = [&](V x, V y) MMFAST_INLINE_LAMBDA {
      if constexpr (kCheckEach<S>) z += (x - x) + (y - y);
      v8d xd[P], yd[P];
      widen(x, xd);
      widen(y, yd);
      for (int q = 0; q < P; ++q) {
        saa[q] += xd[q] * xd[q];
        sab[q] += xd[q] * yd[q];
        sbb[q] += yd[q] * yd[q];
      }
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) step(S::load(pa + i), S::load(pb + i));
    if (i < m) step(load_tail<S>(pa + i, m - i), load_tail<S>(pb + i, m - i));
    aa += hsum<P>(saa);
    ab += hsum<P>(sab);
    bb += hsum<P>(sbb);
  }
  p.aa = aa;
  p.ab = ab;
  p.bb = bb;
  p.sq = 0;
  p.finite = kCheckEach<S> ? all_zero<S>(z) : std::isfinite(aa) && std::isfinite(bb);
}

// out = ca*a + cb*b formed in fp64 with fp64 coefficients (under strong conflict the two
// terms cancel to 1e-4 of their size: fp32 coefficients would cost 6e-8 / 1e-4 of the
// result), rounded once to the storage type; <out,out> over the fp64 values. An input the
// mode drops is not read (unless the Gram rides along), so its NaN cannot reach out.
// `finite` is read only with the Gram (combine.cpp): checked then, as in gram_range.
template <class S, Mode M, bool G>
MMFAST_INLINE void combine_range(const typename S::T* a, const typename S::T* b, typename S::T* o, int64_t n,
                                 double ca, double cb, Partial& p) {
  using V = typename S::V;
  constexpr int64_t W = S::W;
  constexpr int P = S::P;
  constexpr bool kReadA = M != kB || G;
  constexpr bool kReadB = M != kA || G;
  double aa = 0, ab = 0, bb = 0, sq = 0;
  V z = {};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const typename S::T* pa = a + start;
    const typename S::T* pb = b + start;
    typename S::T* po = o + start;
    v8d ssq[P] = {}, saa[P] = {}, sab[P] = {}, sbb[P] = {};
    auto step = [&](V x, V y) MMFAST_INLINE_LAMBDA {
      if constexpr (G && kCheckEach<S>) z += (x - x) + (y - y);
      v8d xd[P], yd[P], vd[P];
      widen(x, xd);
      widen(y, yd);
      for (int q = 0; q < P; ++q) {
        vd[q] = M == kAB ? ca * xd[q] + cb * yd[q] : (M == kA ? ca * xd[q] : cb * yd[q]);
        ssq[q] += vd[q] * vd[q];
        if constexpr (G) {
          saa[q] += xd[q] * xd[q];
          sab[q] += xd[q] * yd[q];
          sbb[q] += yd[q] * yd[q];
        }
      }
      V v;
      narrow(vd, v);
      return v;
    };
    int64_t i = 0;
    for (; i + W <= m; i += W) {
      const V x = kReadA ? S::load(pa + i) : V{};
      const V y = kReadB ? S::load(pb + i) : V{};
      S::store(po + i, step(x, y));
    }
    if (i < m) {
      const V x = kReadA ? load_tail<S>(pa + i, m - i) : V{};
      const V y = kReadB ? load_tail<S>(pb + i, m - i) : V{};
      store_tail<S>(po + i, step(x, y), m - i);
    }
    sq += hsum<P>(ssq);
    if constexpr (G) {
      aa += hsum<P>(saa);
      ab += hsum<P>(sab);
      bb += hsum<P>(sbb);
    }
  }
  p.aa = aa;
  p.ab = ab;
  p.bb = bb;
  p.sq = sq;
  p.finite = !G || (kCheckEach<S> ? all_zero<S>(z) : std::isfinite(aa) && std::isfinite(bb));
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

}  // namespace

void gram_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end,
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

void combine_chunks(const TensorRef* tensors, const Coef* coefs, const Chunk* chunks, int64_t begin,
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

void scale_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end,
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

}  // namespace mmfast::cpu::MMFAST_ISA
