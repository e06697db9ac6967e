// Shared by the CPU operators: argument checks and the chunk table.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include <memory>
#include <optional>
#include <vector>

#include "../args.h"
#include "../precision.h"
#include "kernels.h"

namespace mmfast::cpu {

// Elements per chunk (precision.h): large enough to stream, small enough to balance two
// threads over a ResNet's tensor sizes. Part of the result's definition (the summation
// order), so it is fixed, not tuned per machine.
using mmfast::kChunk;
// Below this many elements the threads cost more than they save.
constexpr int64_t kSerialBelow = 1 << 16;

inline Dtype dtype_code(c10::ScalarType s) {  // after check_args: one of the four
  switch (s) {
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kF32;
  }
}

inline void check_cpu(at::TensorList ts) {
  TORCH_CHECK_VALUE(ts[0].device().is_cpu(), "backend='cpu' needs CPU tensors, got tensors on ", ts[0].device());
}

// The scalar arguments, as mmfast/_args.py words them (for direct calls of the operator).
inline void check_scalars(double gamma, double alpha, std::optional<double> max_norm) {
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0, "gamma: expected a finite positive number, got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(alpha), "alpha: expected a finite number, got ", alpha);
  TORCH_CHECK_VALUE(!max_norm || (std::isfinite(*max_norm) && *max_norm > 0),
                    "max_norm: expected a finite positive number, got ", *max_norm);
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

// What a layout fixes (csrc/args.h): the checks passed, the tensors' addresses, the
// chunk table (in tensor order), the group of each tensor, which groups have a member.
struct CpuLayout : CachedLayout {
  std::vector<TensorRef> refs;
  std::vector<Chunk> chunks;
  int64_t total = 0;  // elements
  std::vector<int64_t> groups;
  std::vector<uint8_t> fusion;  // empty or one 0/1 per tensor
  std::vector<uint8_t> used;    // per group: a tensor has this id
};

// The cached layout of a call (built, and the arguments checked, on a miss). lists[ia]
// and lists[ib] are read as a and b, lists[io] written (io = -1: nothing written).
std::shared_ptr<CpuLayout> cpu_layout(int64_t op, const std::vector<NamedList>& lists, at::IntArrayRef groups,
                                      at::IntArrayRef fusion, int ia, int ib, int io);
int64_t cpu_layouts_cached();

// clip_grad_norm_'s coefficient, min(1, max_norm / (total_norm + 1e-6)), applied to
// every output in a rescale pass only when it bites (a NaN norm bites, as in torch).
inline double clip_in_place(const std::vector<TensorRef>& refs, const std::vector<Chunk>& chunks, int64_t total,
                            std::optional<double> max_norm, double total_norm) {
  if (!max_norm) return 1.0;
  const double clip = clip_coefficient(*max_norm, total_norm);
  if (!(clip >= 1.0)) {
    for_chunks(static_cast<int64_t>(chunks.size()), total,
               [&](int64_t b, int64_t e) { scale_chunks(refs.data(), chunks.data(), b, e, clip); });
  }
  return clip;
}

}  // namespace mmfast::cpu
