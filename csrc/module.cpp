// The mmfast._C extension: defines the mmfast operators (backends register their
// kernels in their own files), their autograd bookkeeping, and a little introspection
// for Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "args.h"
#include "fast_calls.h"
#include "cpu/kernels.h"
#include "precision.h"

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
  // The K x K weightings (csrc/solvers.h): G [B, K, K] -> weights [B, K] in G's dtype.
  // eps: the rounding unit behind the rank cutoffs; orders: pcgrad's K x K order table.
  m.def(
      "weighting(Tensor G, str weighting, float c, float norm_eps, int rescale, float reg_eps, float rcond, int main, "
      "int[] orders, float eps) -> Tensor");
  // aggregate_'s step between its passes: per-tensor Grams [T, K, K] -> (group Grams [G, K, K],
  // weights [G, K], combine coefficients [T, K]); layout from mmfast/_multi.py; gamma:
  // mmpareto's rescale.
  m.def(
      "aggregate_weights(Tensor per_tensor, Tensor layout, int num_groups, str weighting, float c, float norm_eps, "
      "int rescale, float reg_eps, float rcond, int main, int[] orders, float eps, float? gamma) "
      "-> (Tensor, Tensor, Tensor)");
  // aggregate_ in one call (gram_k, aggregate_weights, combine_k_): returns (group Grams
  // [G, K, K], weights [G, K], total_norm, all_finite). per_tensor given: no Gram pass.
  m.def(
      "aggregate_k_(Tensor(a!)[] out, Tensor[] grads, int K, Tensor? per_tensor, Tensor layout, int num_groups, "
      "str weighting, float c, float norm_eps, int rescale, float reg_eps, float rcond, int main, int[] orders, "
      "float eps, float? gamma) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace mmfast {
bool cuda_built();

namespace {

// What torch's generated ADInplaceOrView kernels do for in-place ops: bump the version
// counter of every tensor the op writes (the schema's Tensor(a!)[] arguments), so autograd
// notices when a tensor saved for backward is overwritten; then run the backend kernel.
// (Custom ops registered for CPU/CUDA only get a fallthrough here, which bumps nothing.)
void bump_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias && alias->isWrite()) {
      const c10::IValue& v = (*stack)[first + i];
      if (v.isTensorList()) bump_versions(v.toTensorList().vec());
      else if (v.isTensor()) bump_versions({v.toTensor()});
    }
  }
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

// mmfast/_args.py's entry to the argument contract for the backends that are not an
// operator of this extension (torch, foreach, triton): the first n_written lists are written.
int64_t check_args_py(const std::vector<std::string>& names, const std::vector<std::vector<at::Tensor>>& lists,
                      int64_t n_written, const std::vector<int64_t>& groups, const std::vector<int64_t>& fusion) {
  std::vector<NamedList> named;
  named.reserve(lists.size());
  for (size_t l = 0; l < lists.size(); ++l)
    named.push_back({names.at(l), lists[l], static_cast<int64_t>(l) < n_written});
  return check_args(named, groups, fusion);
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, ADInplaceOrView, m) {
  for (const char* name : {"combine_", "clip_", "combine_k_", "aggregate_k_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&mmfast::bump_then_redispatch>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  mmfast::cpu::isa();  // MMFAST_CPU_ISA is read now: a bad value fails the import, not a kernel
  mmfast::add_fast_calls(m);  // csrc/fast_calls.h
  m.def("simd_level", &mmfast::cpu::simd_level, "Instruction set the CPU kernels dispatch to on this machine.");
  m.def("cuda_built", &mmfast::cuda_built, "Whether this build includes the CUDA kernels.");
  m.def("check_args", &mmfast::check_args_py, "The argument contract of the mmfast ops (csrc/args.h).");
  m.def("constants", []() {
    return std::map<std::string, double>{{"chunk", static_cast<double>(mmfast::kChunk)}, {"zero_tol", mmfast::kZeroTol}};
  }, "The precision constants of csrc/precision.h (mmfast/reference.py holds the same).");
}
