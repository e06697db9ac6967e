// The two passes over gradient memory, on plain pointers (no ATen here, so the loops
// can be compiled once per instruction set: isa.h).
#pragma once

#include <cstdint>

namespace mmfast::cpu {

enum Dtype : int8_t { kF32, kF64, kBF16, kF16 };

// What the combine writes: ca*a + cb*b, ca*a alone, or cb*b alone. Dropping an
// input (rather than multiplying it by 0) keeps a NaN in a discarded gradient out
// of the result, as the DGL reference does, and skips reading it.
enum Mode : int8_t { kAB, kA, kB };

struct TensorRef {
  const void* a;
  const void* b;
  void* out;
  Dtype dtype;
};

// A fixed-size piece of one tensor: the unit of parallel work. Partial sums are
// kept per chunk and added in chunk order, so results do not depend on threads.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t n;
};

struct Partial {
  double aa, ab, bb;  // <a,a>, <a,b>, <b,b> over the chunk
  double sq;          // <out,out> over the chunk (combine pass)
  bool finite;        // every input element read was finite
};

struct Coef {
  double ca, cb;
  Mode mode;
};

// Each processes chunks [begin, end) and writes partials[c] for each.
void gram_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end, Partial* partials);
void combine_chunks(const TensorRef* tensors, const Coef* coefs, const Chunk* chunks, int64_t begin, int64_t end,
                    bool with_gram, Partial* partials);
void scale_chunks(const TensorRef* tensors, const Chunk* chunks, int64_t begin, int64_t end, double coef);

// The instruction set whose build of the loops runs (isa.h): the best this CPU has, or a
// lower one named by MMFAST_CPU_ISA=avx512|avx2|baseline (read once; for tests). A level
// the CPU lacks, or another value, is an error at the first kernel call.
enum class Isa : int8_t { kBaseline, kAvx2, kAvx512 };
Isa isa();
const char* simd_level();

}  // namespace mmfast::cpu
