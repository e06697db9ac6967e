// The K-objective passes on plain pointers (kernels_multi.cpp; multi.cpp calls them).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace mmfast::cpu {

// K objectives: tensor t's K gradients and its output. K <= 32, as the weightings
// (csrc/solvers.h, kMaxK).
constexpr int kMaxObjectives = 32;
struct MultiRef {
  const void* in[kMaxObjectives];
  void* out;
  Dtype dtype;
};

// partials[c * K * K ...]: the chunk's K x K Gram (fp64 products and sums); finite[c].
void gram_k_chunks(const MultiRef* tensors, int K, const Chunk* chunks, int64_t begin, int64_t end, double* partials,
                   bool* finite);
// out = sum_k coefs[t * K + k] * in_k; sq[c] = <out, out> over the chunk.
void combine_k_chunks(const MultiRef* tensors, int K, const double* coefs, const Chunk* chunks, int64_t begin,
                      int64_t end, double* sq);

}  // namespace mmfast::cpu
