// Portable SIMD for the CPU kernels: GCC/Clang vector extensions, with intrinsics where
// the portable form compiles badly (MMFAST_AVX512 / MMFAST_AVX2).
//
// A v16f is 16 floats; the compiler lowers it to one zmm (AVX-512), two ymm (AVX2) or
// four xmm (SSE2), whichever the instruction set of the build allows. Included once per
// build (isa.h), into that build's namespace: no include guard. Loads and stores go
// through memcpy or unaligned intrinsics: gradients carry no alignment promise.
namespace mmfast::cpu::MMFAST_ISA {
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

#define MMFAST_INLINE inline __attribute__((always_inline))
#define MMFAST_INLINE_LAMBDA __attribute__((always_inline))

template <typename To, typename From>
MMFAST_INLINE To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// bfloat16 <-> float. Round to nearest even; NaN stays a quiet NaN (as c10::BFloat16).
MMFAST_INLINE v16f bf16_to_f32(v16h h) {
  return bit_cast<v16f>(__builtin_convertvector(h, v16u) << 16);
}
MMFAST_INLINE v16h f32_to_bf16(v16f f) {
  v16u u = bit_cast<v16u>(f);
  v16u rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  v16u nan = v16u{} + 0x7FC0u;
  return __builtin_convertvector(bit_cast<v16u>((f != f) ? bit_cast<v16i>(nan) : bit_cast<v16i>(rounded)), v16h);
}

// IEEE half <-> float, exact and branch-free (the classic fp16 bit tricks; the
// same rounding as c10::Half), so they vectorise without F16C.
MMFAST_INLINE v16f f16_to_f32(v16h h) {
  const v16u w = __builtin_convertvector(h, v16u) << 16;
  const v16u sign = w & 0x80000000u;
  const v16u two_w = w + w;
  const v16f normalized = bit_cast<v16f>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const v16f denormalized = bit_cast<v16f>((two_w >> 17) | (126u << 23)) - 0.5f;
  const v16i is_denorm = bit_cast<v16i>(two_w < (1u << 27));
  const v16i magnitude = is_denorm ? bit_cast<v16i>(denormalized) : bit_cast<v16i>(normalized);
  return bit_cast<v16f>(sign | bit_cast<v16u>(magnitude));
}
MMFAST_INLINE v16h f32_to_f16(v16f f) {
  const v16u w = bit_cast<v16u>(f);
  const v16u shl1_w = w + w;
  const v16u sign = w & 0x80000000u;
  v16f base = bit_cast<v16f>(w & 0x7FFFFFFFu) * 0x1.0p+112f * 0x1.0p-110f;
  v16u bias = shl1_w & 0xFF000000u;
  bias = bit_cast<v16u>((bias < 0x71000000u) ? bit_cast<v16i>(v16u{} + 0x71000000u) : bit_cast<v16i>(bias));
  base = bit_cast<v16f>((bias >> 1) + 0x07800000u) + base;
  const v16u bits = bit_cast<v16u>(base);
  const v16u nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const v16u nan = v16u{} + 0x7E00u;
  const v16u mag = bit_cast<v16u>((shl1_w > 0xFF000000u) ? bit_cast<v16i>(nan) : bit_cast<v16i>(nonsign));
  return __builtin_convertvector((sign >> 16) | mag, v16h);
}

// Storage types: how 16 elements of each dtype load into and store from v16f.
struct F32 {
  using T = float;
  static MMFAST_INLINE v16f load(const T* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }
  static MMFAST_INLINE void store(T* p, v16f v) { std::memcpy(p, &v, sizeof v); }
};
struct BF16 {
  using T = uint16_t;
#if MMFAST_AVX512  // one vpmovzxwd from memory (the portable form: four shuffles more)
  static MMFAST_INLINE v16f load(const T* p) {
    return (v16f)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
#else
  static MMFAST_INLINE v16f load(const T* p) { v16h v; std::memcpy(&v, p, sizeof v); return bf16_to_f32(v); }
#endif
  static MMFAST_INLINE void store(T* p, v16f v) { v16h h = f32_to_bf16(v); std::memcpy(p, &h, sizeof h); }
};
// F16C (in AVX2 and AVX-512 builds) converts in one instruction, rounding to nearest even
// as c10::Half does; NaN stays NaN (its payload may differ: no rule reads it).
struct F16 {
  using T = uint16_t;
#if MMFAST_AVX512
  static MMFAST_INLINE v16f load(const T* p) { return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static MMFAST_INLINE void store(T* p, v16f v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif MMFAST_AVX2
  static MMFAST_INLINE v16f load(const T* p) {
    const __m256 half[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
                            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
    v16f v;
    std::memcpy(&v, half, sizeof v);
    return v;
  }
  static MMFAST_INLINE void store(T* p, v16f v) {
    __m256 half[2];
    std::memcpy(half, &v, sizeof v);
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(half[0], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128((__m128i*)(p + 8), _mm256_cvtps_ph(half[1], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  static MMFAST_INLINE v16f load(const T* p) { v16h v; std::memcpy(&v, p, sizeof v); return f16_to_f32(v); }
  static MMFAST_INLINE void store(T* p, v16f v) { v16h h = f32_to_f16(v); std::memcpy(p, &h, sizeof h); }
#endif
};

typedef float v8f __attribute__((vector_size(32)));

// fp64 lanes for the maths (docs/semantics.md, Precision): a v16f widens to two v8d (fp32
// products are exact in fp64), a v8d is its own single part. Results narrow back once.
// AVX-512: one vcvtps2pd / vcvtpd2ps per half (GCC 12 splits the portable form in four).
MMFAST_INLINE void widen(v16f x, v8d* d) {
#if MMFAST_AVX512
  const __m512d both = _mm512_castps_pd((__m512)x);
  d[0] = (v8d)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(both)));
  d[1] = (v8d)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(both, 1)));
#else
  d[0] = __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), v8d);
  d[1] = __builtin_convertvector(__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), v8d);
#endif
}
MMFAST_INLINE void widen(v8d x, v8d* d) { d[0] = x; }
MMFAST_INLINE void narrow(const v8d* d, v16f& x) {
#if MMFAST_AVX512
  const __m256 lo = _mm512_cvtpd_ps((__m512d)d[0]), hi = _mm512_cvtpd_ps((__m512d)d[1]);
  x = (v16f)_mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
#else
  const v8f lo = __builtin_convertvector(d[0], v8f), hi = __builtin_convertvector(d[1], v8f);
  x = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}
MMFAST_INLINE void narrow(const v8d* d, v8d& x) { x = d[0]; }

// Sum of the lanes of P v8d parts: parts lanewise, then a fixed pairwise tree (depth 3).
template <int P>
MMFAST_INLINE double hsum(const v8d* parts) {
  v8d v = parts[0];
  for (int p = 1; p < P; ++p) v += parts[p];
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

}  // namespace
}  // namespace mmfast::cpu::MMFAST_ISA
