// The K x K weightings on CUDA tensors: mmfast::weighting (a batch of Gram matrices) and
// mmfast::aggregate_weights (aggregate_'s step between its passes), the CUDA side of
// csrc/cpu/weightings.cpp with the same solvers (csrc/solvers.h): the same operations in
// the same order (no atomics), so the same weights up to the compilers' fma contraction
// (tests/test_multi_cuda.py checks 1e-12), deterministically.
//
// One thread block per group: the block loads the group's K x K matrix (or sums it from
// the per-tensor Grams) into shared memory, one thread runs the solver on a workspace in
// dynamic shared memory (workspace(K) doubles: 38 KB at K = 32), the block writes the
// weights. The solvers are sequential active-set methods on a K <= 32 problem with fixed
// loop bounds (solvers.h), so the work per call is bounded and nothing is read back on
// the host: the weights stay on the device, and the ops are capturable in a CUDA graph.
// Their small fixed-size local arrays (solvers.h: double[kMaxK]) live in the thread's
// stack frame (ptxas reports it; they are not spills).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>

#include "../weighting_args.h"
#include "weightings.h"

namespace mmfast::cuda {
namespace {

constexpr int kSolveThreads = 32;   // loads and stores; one of them solves
constexpr int kGroupThreads = 128;  // group sums of the per-tensor Grams
constexpr int kCoefThreads = 128;

// Doubles of dynamic shared memory per block: G (K x K), w (K), the solver's workspace.
constexpr int smem_doubles(int K) { return K * K + K + solve::workspace(K); }
static_assert(smem_doubles(solve::kMaxK) * sizeof(double) <= 48 * 1024,
              "the solver's shared memory must fit the default 48 KB per block");

// One kernel per weighting M: ptxas spills registers when the six solvers share one. The
// solver kernels ask for one block per SM in __launch_bounds__: without it ptxas keeps
// 48-64 registers and spills (occupancy does not matter here: one thread per block works).
template <int M>
__device__ __forceinline__ void solve_block(const double* G, const solve::Params& p, double* w, double* ws) {
  __syncthreads();
  if (threadIdx.x == 0) solve::weigh_as<M>(G, p, w, ws);
  __syncthreads();
}

// f(std::integral_constant<int, M>{}) for M = p.method.
template <class F>
void by_method(int m, const F& f) {
  switch (m) {
    case solve::kMgda: f(std::integral_constant<int, solve::kMgda>{}); break;
    case solve::kPcgrad: f(std::integral_constant<int, solve::kPcgrad>{}); break;
    case solve::kCagrad: f(std::integral_constant<int, solve::kCagrad>{}); break;
    case solve::kImtlg: f(std::integral_constant<int, solve::kImtlg>{}); break;
    case solve::kUpgrad: f(std::integral_constant<int, solve::kUpgrad>{}); break;
    default: f(std::integral_constant<int, solve::kMmpareto>{}); break;
  }
}

// G [B, K, K] float64 -> w [B, K] float64; block b solves group b.
template <int M>
__global__ void __launch_bounds__(kSolveThreads, 1) weigh_kernel(const double* __restrict__ G, int64_t B,
                                                              const solve::Params p, double* __restrict__ w) {
  extern __shared__ double smem[];
  const int K = p.K, KK = K * K;
  double* g = smem;
  double* wg = g + KK;
  double* ws = wg + K;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    for (int j = threadIdx.x; j < KK; j += blockDim.x) g[j] = G[b * KK + j];
    solve_block<M>(g, p, wg, ws);
    for (int k = threadIdx.x; k < K; k += blockDim.x) w[b * K + k] = wg[k];
  }
}

// aggregate_weights, first part: block g sums the per-tensor Grams of group g in tensor
// order (the CPU's order: the same fp64 sums), writes it to gram[g], solves it into w[g].
// layout: ids [T], first [G + 2], order [T]; entries out of range are skipped.
template <int M>
__global__ void __launch_bounds__(kGroupThreads, 1) group_weights_kernel(const double* __restrict__ per, int64_t T,
                                                                      const int64_t* __restrict__ layout, int64_t G,
                                                                      const solve::Params p,
                                                                      double* __restrict__ gram,
                                                                      double* __restrict__ w) {
  extern __shared__ double smem[];
  const int K = p.K, KK = K * K;
  const int64_t* ids = layout;
  const int64_t* first = layout + T;
  const int64_t* order = first + G + 2;
  double* gs = smem;
  double* wg = gs + KK;
  double* ws = wg + K;
  for (int64_t g = blockIdx.x; g < G; g += gridDim.x) {
    const int64_t b = first[g] < 0 ? 0 : first[g];
    const int64_t e = first[g + 1] > T ? T : first[g + 1];
    for (int j = threadIdx.x; j < KK; j += blockDim.x) {
      double s = 0;
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = order[i];
        if (t >= 0 && t < T && ids[t] == g) s += per[t * KK + j];
      }
      gs[j] = s;
      gram[g * KK + j] = s;
    }
    solve_block<M>(gs, p, wg, ws);
    for (int k = threadIdx.x; k < K; k += blockDim.x) w[g * K + k] = wg[k];
  }
}

// aggregate_weights, second part: one thread per tensor: coefs[t] = w[ids[t]] (times
// mmpareto's per-tensor rescale), 1 outside every group (id -1), NaN for an id out of range.
__global__ void __launch_bounds__(kCoefThreads) coefs_kernel(const double* __restrict__ per, int64_t T, int K,
                                                             const int64_t* __restrict__ ids, int64_t G,
                                                             const double* __restrict__ w, bool rescaled, double gamma,
                                                             double* __restrict__ coefs) {
  const int KK = K * K;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = ids[t];
    double* ct = coefs + t * K;
    if (g < 0 || g >= G) {
      const double v = g == -1 ? 1.0 : NAN;
      for (int k = 0; k < K; ++k) ct[k] = v;
      continue;
    }
    const double* wt = w + g * K;
    const double s = rescaled ? solve::mmpareto_scale_k(per + t * KK, wt, K, gamma) : 1.0;
    for (int k = 0; k < K; ++k) ct[k] = wt[k] * s;
  }
}

// Blocks for n independent items (grid-stride loops take the rest).
unsigned grid_for(int64_t n, int64_t per_block) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < (int64_t{1} << 30) ? blocks : (int64_t{1} << 30));
}

size_t smem_bytes(int K) { return static_cast<size_t>(smem_doubles(K)) * sizeof(double); }

at::Tensor weighting_cuda(const at::Tensor& G, const std::string& method, double c, double norm_eps, int64_t rescale,
                          double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps) {
  const char* op = "mmfast::weighting";
  check_gram(op, G);
  TORCH_CHECK_VALUE(G.is_cuda(), op, ": G: expected a CUDA tensor, got one on ", G.device());
  const int64_t B = G.size(0), K = G.size(1);
  const solve::Params p = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  c10::cuda::CUDAGuard guard(G.device());
  at::Tensor G64 = G.to(at::kDouble).contiguous();
  at::Tensor w = at::empty({B, K}, G64.options());
  if (B > 0) {
    by_method(p.method, [&](auto m) {
      weigh_kernel<decltype(m)::value><<<grid_for(B, 1), kSolveThreads, smem_bytes(static_cast<int>(K)),
                                         at::cuda::getCurrentCUDAStream()>>>(G64.const_data_ptr<double>(), B, p,
                                                                             w.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return G.scalar_type() == at::kDouble ? w : w.to(G.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_weights_cuda(
    const at::Tensor& per_tensor, const at::Tensor& layout, int64_t num_groups, const std::string& method, double c,
    double norm_eps, int64_t rescale, double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps,
    std::optional<double> gamma) {
  const char* op = "mmfast::aggregate_weights";
  check_layout(op, per_tensor, layout, num_groups);
  TORCH_CHECK_VALUE(per_tensor.is_cuda(), op, ": per_tensor: expected a CUDA tensor");
  const int64_t K = per_tensor.size(1);
  const solve::Params p = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  c10::cuda::CUDAGuard guard(per_tensor.device());
  return aggregate_weights_on_device(per_tensor, layout, num_groups, p, gamma);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_weights_on_device(const at::Tensor& per,
                                                                            const at::Tensor& layout, int64_t G,
                                                                            const solve::Params& p,
                                                                            std::optional<double> gamma) {
  const int64_t T = per.size(0), K = p.K;
  auto f64 = per.options().dtype(at::kDouble);
  at::Tensor gram = at::empty({G, K, K}, f64), w = at::empty({G, K}, f64), coefs = at::empty({T, K}, f64);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (G > 0) {
    by_method(p.method, [&](auto m) {
      group_weights_kernel<decltype(m)::value><<<grid_for(G, 1), kGroupThreads, smem_bytes(static_cast<int>(K)),
                                                 stream>>>(per.const_data_ptr<double>(), T,
                                                           layout.const_data_ptr<int64_t>(), G, p,
                                                           gram.data_ptr<double>(), w.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (T > 0) {
    const bool rescaled = gamma.has_value() && p.method == solve::kMmpareto;
    coefs_kernel<<<grid_for(T, kCoefThreads), kCoefThreads, 0, stream>>>(
        per.const_data_ptr<double>(), T, static_cast<int>(K), layout.const_data_ptr<int64_t>(), G,
        w.const_data_ptr<double>(), rescaled, rescaled ? *gamma : 1.0, coefs.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gram, w, coefs};
}

}  // namespace mmfast::cuda

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("weighting", &mmfast::cuda::weighting_cuda);
  m.impl("aggregate_weights", &mmfast::cuda::aggregate_weights_cuda);
}
