// Building blocks of the CPU loops, shared by both loop headers (kernels_loops.h: two
// objectives; kernels_multi_loops.h: K objectives). Included once per instruction-set
// build (isa.h), into that build's namespace: no include guard.
#include "vec.h"

namespace mmfast::cpu::MMFAST_ISA {
namespace {

struct F64 {
  using T = double;
  using V = v8d;
  static constexpr int64_t W = 8;
  static constexpr int P = 1;  // v8d parts per vector (fp64 lanes of the maths)
  static MMFAST_INLINE V load(const T* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static MMFAST_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
};
template <class S>
struct Wide : S {
  using V = v16f;
  static constexpr int64_t W = 16;
  static constexpr int P = 2;
};

// Sums run in fp64 lanes over blocks this long; the block sums then add up in order
// (summation depth: mmfast/reference.py, ZERO_TOL).
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

// Whether finiteness is checked value by value: only for fp64 storage, whose squares can
// overflow the fp64 sums. For the others a sum of squares is non-finite exactly when a
// value in it is, which the loops read off their sums.
template <class S>
constexpr bool kCheckEach = std::is_same_v<typename S::T, double>;

template <class S>
MMFAST_INLINE bool all_zero(typename S::V z) {
  // z accumulates (x - x): 0 for finite x, NaN otherwise.
  bool ok = true;
  for (int64_t j = 0; j < S::W; ++j) ok &= (z[j] == 0);
  return ok;
}

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
}  // namespace mmfast::cpu::MMFAST_ISA
