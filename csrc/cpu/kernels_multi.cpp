// Entry points of the K-objective CPU loops (kernels_multi_loops.h, one build per
// instruction set: isa.h; the choice is cpu::isa(), kernels.cpp).
#include "kernels_multi.h"

#define MMFAST_LOOPS "kernels_multi_loops.h"
#include "isa.h"

namespace mmfast::cpu {

void gram_k_chunks(const MultiRef* tensors, int K, const Chunk* chunks, int64_t begin, int64_t end, double* partials,
                   bool* finite) {
  static const auto fn = MMFAST_PICK(gram_k_chunks);
  fn(tensors, K, chunks, begin, end, partials, finite);
}

void combine_k_chunks(const MultiRef* tensors, int K, const double* coefs, const Chunk* chunks, int64_t begin,
                      int64_t end, double* sq) {
  static const auto fn = MMFAST_PICK(combine_k_chunks);
  fn(tensors, K, coefs, chunks, begin, end, sq);
}

}  // namespace mmfast::cpu
