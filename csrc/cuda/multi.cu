// K objectives on CUDA tensors: mmfast::gram_k and mmfast::combine_k_ (see
// csrc/cpu/multi.cpp for the contract). One block per chunk; each thread keeps its
// K(K+1)/2 fp64 pair sums (fp32 products are exact in fp64), reduced per pair over the
// block; per-tensor sums of the chunk partials in chunk order on the device (no atomics,
// no host sync). The combine forms sum_k c_k g_k in fp64 with fp64 coefficients.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../precision.h"

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxK = 16;
enum Dtype : int32_t { kF32, kF64, kBF16, kF16 };

struct MultiChunk {
  const void* in[kMaxK];
  void* o;
  int64_t n;
  int64_t tensor;
  int32_t dtype;
};

__device__ __forceinline__ double load(const void* p, int64_t i, int32_t d) {
  switch (d) {
    case kF64: return static_cast<const double*>(p)[i];
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store(void* p, int64_t i, int32_t d, double v) {
  switch (d) {
    case kF64: static_cast<double*>(p)[i] = v; break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(static_cast<float>(v)); break;
    case kF16: static_cast<__half*>(p)[i] = __float2half(static_cast<float>(v)); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// Sum of v over the block, returned to thread 0.
__device__ double block_sum(double v, double* smem) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) s += smem[w];
  __syncthreads();
  return s;
}

__global__ void gram_k_kernel(const MultiChunk* chunks, int K, double* partial) {
  __shared__ double smem[kThreads / 32];
  const MultiChunk& c = chunks[blockIdx.x];
  double s[kMaxK * (kMaxK + 1) / 2];
  const int pairs = K * (K + 1) / 2;
  for (int j = 0; j < pairs; ++j) s[j] = 0.0;
  double fin = 0.0;
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    double x[kMaxK];
    for (int k = 0; k < K; ++k) {
      x[k] = load(c.in[k], i, c.dtype);
      fin += x[k] - x[k];
    }
    int idx = 0;
    for (int p = 0; p < K; ++p)
      for (int q = 0; q <= p; ++q, ++idx) s[idx] = fma(x[p], x[q], s[idx]);
  }
  double* out = partial + blockIdx.x * (K * K + 1);
  int idx = 0;
  for (int p = 0; p < K; ++p) {
    for (int q = 0; q <= p; ++q) {
      const double v = block_sum(s[idx++], smem);
      if (threadIdx.x == 0) out[p * K + q] = out[q * K + p] = v;
    }
  }
  const double f = block_sum(fin, smem);
  if (threadIdx.x == 0) out[K * K] = f;
}

__global__ void combine_k_kernel(const MultiChunk* chunks, int K, const double* coefs, double* partial) {
  __shared__ double smem[kThreads / 32];
  const MultiChunk& c = chunks[blockIdx.x];
  double w[kMaxK];
  for (int k = 0; k < K; ++k) w[k] = coefs[c.tensor * K + k];
  double sq = 0.0;
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    double v = 0.0;
    for (int k = 0; k < K; ++k) v = fma(w[k], load(c.in[k], i, c.dtype), v);
    store(c.o, i, c.dtype, v);
    sq = fma(v, v, sq);
  }
  const double s = block_sum(sq, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Per-tensor sums of `width` columns of the chunk partials, each tensor's chunks in order.
__global__ void per_tensor_sum(const double* partial, int width, const int64_t* first, int64_t T, double* out) {
  for (int64_t t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
    for (int j = 0; j < width; ++j) {
      double s = 0.0;
      for (int64_t c = first[t]; c < first[t + 1]; ++c) s += partial[c * width + j];
      out[t * width + j] = s;
    }
  }
}

int32_t dtype_code(c10::ScalarType s, size_t i) {
  switch (s) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK_TYPE(false, "mmfast: grads[", i, "]: expected a floating dtype, got ", s);
  }
}

struct Plan {
  at::Tensor chunks, first;
  int64_t n_chunks = 0, T = 0;
};

Plan plan(const char* op, at::TensorList grads, int64_t K, at::TensorList out) {
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, op, ": K: expected 1..", kMaxK, " objectives, got ", K);
  TORCH_CHECK_VALUE(!grads.empty() && grads.size() % K == 0, op, ": grads: expected a positive multiple of K tensors");
  Plan p;
  p.T = static_cast<int64_t>(grads.size()) / K;
  TORCH_CHECK_VALUE(out.empty() || static_cast<int64_t>(out.size()) == p.T, op, ": out: expected ", p.T, " tensors");
  std::vector<MultiChunk> host;
  std::vector<int64_t> first{0};
  for (int64_t t = 0; t < p.T; ++t) {
    const at::Tensor& like = out.empty() ? grads[t * K] : out[t];
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& g = grads[t * K + k];
      TORCH_CHECK_VALUE(g.is_cuda() && g.device() == grads[0].device() && g.is_contiguous() &&
                            g.sizes() == like.sizes() && g.scalar_type() == like.scalar_type(),
                        op, ": grads[", t * K + k, "]: expected a contiguous ", like.scalar_type(), " tensor of shape ",
                        like.sizes(), " on ", grads[0].device());
    }
    const int64_t n = like.numel(), item = like.element_size();
    const int32_t d = dtype_code(like.scalar_type(), t * K);
    for (int64_t b = 0; b < n; b += kChunk) {
      MultiChunk c{};
      for (int64_t k = 0; k < K; ++k) c.in[k] = static_cast<const char*>(grads[t * K + k].data_ptr()) + b * item;
      c.o = out.empty() ? nullptr : static_cast<char*>(out[t].data_ptr()) + b * item;
      c.n = std::min(kChunk, n - b);
      c.tensor = t;
      c.dtype = d;
      host.push_back(c);
    }
    first.push_back(static_cast<int64_t>(host.size()));
  }
  p.n_chunks = static_cast<int64_t>(host.size());
  at::Tensor h = at::empty({static_cast<int64_t>(std::max<size_t>(host.size(), 1) * sizeof(MultiChunk))}, at::kByte);
  if (!host.empty()) std::memcpy(h.data_ptr(), host.data(), host.size() * sizeof(MultiChunk));
  p.chunks = h.to(grads[0].device());
  p.first = at::tensor(first, at::kLong).to(grads[0].device());
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gram_k_cuda(at::TensorList grads, int64_t K) {
  c10::cuda::CUDAGuard guard(grads[0].device());
  Plan p = plan("mmfast::gram_k", grads, K, {});
  auto f64 = at::TensorOptions().device(grads[0].device()).dtype(at::kDouble);
  const int width = static_cast<int>(K * K + 1);
  at::Tensor partial = at::zeros({std::max<int64_t>(p.n_chunks, 1), width}, f64);
  at::Tensor per = at::zeros({p.T, width}, f64);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* chunks = reinterpret_cast<const MultiChunk*>(p.chunks.data_ptr());
  if (p.n_chunks) {
    gram_k_kernel<<<p.n_chunks, kThreads, 0, stream>>>(chunks, static_cast<int>(K), partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int blocks = static_cast<int>(std::min<int64_t>((p.T + kThreads - 1) / kThreads, 1024));
  per_tensor_sum<<<blocks, kThreads, 0, stream>>>(partial.data_ptr<double>(), width, p.first.data_ptr<int64_t>(), p.T,
                                                  per.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {per.narrow(1, 0, K * K).reshape({p.T, K, K}).contiguous(), (per.select(1, K * K) == 0).all()};
}

at::Tensor combine_k_cuda(at::TensorList out, at::TensorList grads, int64_t K, const at::Tensor& coefs) {
  c10::cuda::CUDAGuard guard(grads[0].device());
  Plan p = plan("mmfast::combine_k_", grads, K, out);
  TORCH_CHECK_VALUE(coefs.device() == grads[0].device() && coefs.scalar_type() == at::kDouble && coefs.dim() == 2 &&
                        coefs.size(0) == p.T && coefs.size(1) == K,
                    "mmfast::combine_k_: coefs: expected a float64 tensor [", p.T, ", ", K, "] on ", grads[0].device());
  at::Tensor c = coefs.contiguous();
  auto f64 = at::TensorOptions().device(grads[0].device()).dtype(at::kDouble);
  at::Tensor partial = at::zeros({std::max<int64_t>(p.n_chunks, 1)}, f64), per = at::zeros({p.T}, f64);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* chunks = reinterpret_cast<const MultiChunk*>(p.chunks.data_ptr());
  if (p.n_chunks) {
    combine_k_kernel<<<p.n_chunks, kThreads, 0, stream>>>(chunks, static_cast<int>(K), c.data_ptr<double>(),
                                                          partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int blocks = static_cast<int>(std::min<int64_t>((p.T + kThreads - 1) / kThreads, 1024));
  per_tensor_sum<<<blocks, kThreads, 0, stream>>>(partial.data_ptr<double>(), 1, p.first.data_ptr<int64_t>(), p.T,
                                                  per.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return per;
}

}  // namespace mmfast::cuda

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("gram_k", &mmfast::cuda::gram_k_cuda);
  m.impl("combine_k_", &mmfast::cuda::combine_k_cuda);
}
