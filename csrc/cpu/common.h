// Shared by the CPU operators: argument checks and the chunk table.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <optional>
#include <vector>

#include "kernels.h"

namespace mmfast::cpu {

// Elements per chunk: large enough to stream, small enough to balance two threads
// over a ResNet's tensor sizes. Part of the result's definition (the fp32 blocks
// live inside chunks), so it is fixed, not tuned per machine.
constexpr int64_t kChunk = 1 << 15;
// Below this many elements the threads cost more than they save.
constexpr int64_t kSerialBelow = 1 << 16;

inline Dtype dtype_code(c10::ScalarType s, const char* op, const char* arg, size_t i) {
  switch (s) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, "[", i, "]: expected float16, bfloat16, float32 or float64, got ",
                       s);
  }
}

inline void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* op, const char* arg, size_t i) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", arg, "[", i, "]: expected a tensor, got None");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, " (cpu backend): ", arg, "[", i,
                    "]: expected a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", arg, "[", i, "]: expected dtype ",
                   like.scalar_type(), " (as out[", i, "]), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", arg, "[", i, "]: expected shape ", like.sizes(),
                    " (as out[", i, "]), got ", t.sizes());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.is_contiguous(), op, ": ", arg, "[", i,
                    "]: expected a contiguous strided tensor (call .contiguous() first)");
}

template <class Fn>
inline void for_chunks(int64_t n_chunks, int64_t n_elements, const Fn& fn) {
  if (n_elements < kSerialBelow) {
    fn(0, n_chunks);
  } else {
    at::parallel_for(0, n_chunks, 1, fn);
  }
}

// Cuts tensor i (numel) into kChunk pieces, appended to chunks.
inline void add_chunks(std::vector<Chunk>& chunks, int64_t i, int64_t numel) {
  for (int64_t begin = 0; begin < numel; begin += kChunk) {
    chunks.push_back({i, begin, std::min(kChunk, numel - begin)});
  }
}

// clip_grad_norm_'s coefficient, min(1, max_norm / (total_norm + 1e-6)), applied to
// every output in a rescale pass only when it bites (a NaN norm bites, as in torch).
inline double clip_in_place(const std::vector<TensorRef>& refs, const std::vector<Chunk>& chunks, int64_t total,
                            std::optional<double> max_norm, double total_norm) {
  if (!max_norm) return 1.0;
  const double clip = std::min(1.0, *max_norm / (total_norm + 1e-6));
  if (!(clip >= 1.0)) {
    for_chunks(static_cast<int64_t>(chunks.size()), total,
               [&](int64_t b, int64_t e) { scale_chunks(refs.data(), chunks.data(), b, e, clip); });
  }
  return clip;
}

}  // namespace mmfast::cpu
