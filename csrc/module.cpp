// The mmfast._C extension: defines the mmfast operators (backends register their
// kernels in their own files) and a little introspection for Python.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(mmfast, m) {
  // groups: one id per tensor, -1 outside every group. fusion: 0/1 per tensor (DGL).
  // Returns (gram[G,3], cos[G], weights[G,2], conflict[G], total_norm, clip_coef, all_finite).
  m.def(
      "combine_(Tensor(a!)[] out, Tensor[] grads_mm, Tensor[] grads_uni, int[] groups, int[] fusion, str method, "
      "float gamma, float alpha, float? max_norm) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Total L2 norm of grads (and per group), clipped in place to max_norm like
  // clip_grad_norm_. Returns (group_sq[G], total_norm, clip_coef, all_finite).
  m.def("clip_(Tensor(a!)[] grads, int[] groups, float? max_norm) -> (Tensor, Tensor, Tensor, Tensor)");
  // K objectives; grads tensor-major (grads[t * K + k]). gram_k returns (per-tensor
  // Gram [T, K, K] float64, all_finite); combine_k_ writes out[t] = sum_k coefs[t, k]
  // grads[t * K + k] and returns the per-tensor squared norms of out [T].
  m.def("gram_k(Tensor[] grads, int K) -> (Tensor, Tensor)");
  m.def("combine_k_(Tensor(a!)[] out, Tensor[] grads, int K, Tensor coefs) -> Tensor");
}

namespace mmfast {
bool cuda_built();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_level", &mmfast::cpu::simd_level, "Instruction set the CPU kernels dispatch to on this machine.");
  m.def("cuda_built", &mmfast::cuda_built, "Whether this build includes the CUDA kernels.");
}
