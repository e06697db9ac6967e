// Entry points of the two-objective CPU loops (kernels_loops.h, one build per instruction
// set: isa.h), and the choice of that instruction set, made once per process.
#include <cstdlib>
#include <stdexcept>
#include <string>

#define MMFAST_LOOPS "kernels_loops.h"
#include "isa.h"

namespace mmfast::cpu {
namespace {

Isa best_isa() {
#if MMFAST_HAVE_ISA_BUILDS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const char* name(Isa i) {
  switch (i) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa choose_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("MMFAST_CPU_ISA");
  if (!env || !*env) return best;
  for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::string(env) != name(i)) continue;
    if (i > best)
      throw std::invalid_argument(std::string("MMFAST_CPU_ISA=") + env + ": this CPU (or this build) runs " +
                                  name(best) + " at most");
    return i;
  }
  throw std::invalid_argument(std::string("MMFAST_CPU_ISA=") + env +
                              ": expected one of avx512, avx2, baseline (or unset: the best this CPU has)");
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose_isa();  // module.cpp calls this at import: a bad value is an ImportError
  return chosen;
}

const char* simd_level() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512 (x86-64-v4)";
    case Isa::kAvx2: return "avx2 (x86-64-v3)";
    default:
#if MMFAST_HAVE_ISA_BUILDS
      return "sse2 (x86-64 baseline)";
#else
      return "generic (compiler vector extensions)";
#endif
  }
}

void gram_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end, Partial* partials) {
  static const auto fn = MMFAST_PICK(gram_chunks);
  fn(tensors, chunks, begin, end, partials);
}

void combine_chunks(const TensorRef* tensors, const Coef* coefs, const Chunk* chunks, int64_t begin, int64_t end,
                    bool with_gram, Partial* partials) {
  static const auto fn = MMFAST_PICK(combine_chunks);
  fn(tensors, coefs, chunks, begin, end, with_gram, partials);
}

void scale_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end, double coef) {
  static const auto fn = MMFAST_PICK(scale_chunks);
  fn(tensors, chunks, begin, end, coef);
}

}  // namespace mmfast::cpu
