// One build of the SIMD loops per x86 instruction set, chosen once at run time.
//
// A translation unit defines MMFAST_LOOPS (the header holding its loops) and includes
// this file: the loops are compiled three times, under #pragma GCC target for AVX-512
// (x86-64-v4) and AVX2+FMA (x86-64-v3), and for the baseline, each into its own
// namespace (mmfast::cpu::avx512, ::avx2, ::baseline). MMFAST_AVX512 / MMFAST_AVX2 tell
// vec.h which intrinsics it may use (GCC's pragma does not redefine __AVX512F__ in C++).
// Why not target_clones: every clone shares one source, so none can use intrinsics, and
// GCC 12 lowers a v8f -> v8d conversion to four instructions where AVX-512 needs one.
//
// The standard headers come first, outside the pragmas: their inline functions stay
// baseline code, so the linker cannot pick an AVX-512 copy for a baseline caller.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

// GCC 11 or later (the x86-64-v3/v4 names); clang does not read #pragma GCC target, so a
// clang build (like a non-x86 one) gets the baseline build only: right, not as fast.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(MMFAST_NO_ISA_BUILDS)
#include <immintrin.h>

// GCC 12 warns inside its own intrinsics (the _mm512_undefined_* pass-through operand of
// vcvtps2pd and friends, GCC bug 105593) when they are inlined under a target pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define MMFAST_ISA avx512
#define MMFAST_AVX512 1
#include MMFAST_LOOPS
#undef MMFAST_AVX512
#undef MMFAST_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define MMFAST_ISA avx2
#define MMFAST_AVX2 1
#include MMFAST_LOOPS
#undef MMFAST_AVX2
#undef MMFAST_ISA
#pragma GCC pop_options
#pragma GCC diagnostic pop

#define MMFAST_HAVE_ISA_BUILDS 1
#endif

#define MMFAST_ISA baseline
#include MMFAST_LOOPS
#undef MMFAST_ISA

// The build of an entry point the machine runs (cpu::isa(), kernels.cpp).
#if MMFAST_HAVE_ISA_BUILDS
#define MMFAST_PICK(fn) \
  (::mmfast::cpu::isa() == ::mmfast::cpu::Isa::kAvx512 ? &avx512::fn \
   : ::mmfast::cpu::isa() == ::mmfast::cpu::Isa::kAvx2 ? &avx2::fn : &baseline::fn)
#else
#define MMFAST_PICK(fn) (&baseline::fn)
#endif
