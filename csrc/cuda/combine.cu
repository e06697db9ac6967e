// The CUDA backend: mmfast::combine_ and mmfast::clip_ on CUDA tensors.
//
// Same two passes as the CPU kernels, in the multi-tensor-apply style: a chunk
// table (tensor pointers, offset, length) on the device, one block per chunk, fp64
// products and sums (SEMANTICS.md, Precision; fp64 FMAs, not a compensated fp32 sum:
// the passes are memory-bound, three fp64 FMAs per 8 bytes read), a per-chunk partial
// written without atomics, then small
// single-block kernels that reduce the partials in a fixed order (fp64) and compute
// the weights, coefficients, norms and statistics on the device. Nothing reads a
// value back to the host, so the whole op can be captured in a CUDA graph (build
// the chunk table once before capture: it is cached per layout).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <list>
#include <optional>
#include <vector>

#include "../args.h"
#include "../precision.h"

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;
enum Dtype : int32_t { kF32, kF64, kBF16, kF16 };
enum Mode : int32_t { kAB, kA, kB };

struct Chunk {
  const void* a;
  const void* b;
  void* o;
  int64_t n;
  int32_t tensor;
  int32_t dtype;
};

__device__ __forceinline__ double load_acc(const void* p, int64_t i, int32_t d) {
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

// Sums `k` values over the block into thread 0 (warp shuffles, then shared memory).
template <int K, typename T>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  __shared__ T smem[K][kThreads / 32];
  for (int j = 0; j < K; ++j)
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0)
    for (int j = 0; j < K; ++j) smem[j][warp] = v[j];
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 0; j < K; ++j) {
      T s = 0;
      for (int w = 0; w < kThreads / 32; ++w) s += smem[j][w];
      v[j] = s;
    }
  }
}

// Pass 1: per chunk (aa, ab, bb, finiteness), products and sums in fp64.
__global__ void gram_kernel(const Chunk* chunks, double* partial) {
  const Chunk c = chunks[blockIdx.x];
  double sd[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    const double x = load_acc(c.a, i, c.dtype), y = load_acc(c.b, i, c.dtype);
    sd[0] = fma(x, x, sd[0]); sd[1] = fma(x, y, sd[1]); sd[2] = fma(y, y, sd[2]); sd[3] += (x - x) + (y - y);
  }
  block_sum<4>(sd);
  if (threadIdx.x == 0)
    for (int j = 0; j < 4; ++j) partial[blockIdx.x * 5 + j] = sd[j];
}

// Pass 2: out = ca*a + cb*b in fp64 with fp64 coefficients (an input a mode drops is not
// read), sum of out^2, and the Gram when the method needs no first pass.
__global__ void combine_kernel(const Chunk* chunks, const double* ca, const double* cb, const int32_t* mode,
                               bool with_gram, double* partial) {
  const Chunk c = chunks[blockIdx.x];
  const double ka = ca[c.tensor], kb = cb[c.tensor];
  const int32_t md = mode[c.tensor];
  const bool use_a = md != kB, use_b = md != kA;
  const bool read_a = use_a || with_gram, read_b = use_b || with_gram;
  double sd[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    const double x = read_a ? load_acc(c.a, i, c.dtype) : 0.0;
    const double y = read_b ? load_acc(c.b, i, c.dtype) : 0.0;
    const double v = (use_a ? ka * x : 0.0) + (use_b ? kb * y : 0.0);
    sd[0] = fma(x, x, sd[0]); sd[1] = fma(x, y, sd[1]); sd[2] = fma(y, y, sd[2]);
    sd[3] += (read_a ? x - x : 0.0) + (read_b ? y - y : 0.0);
    sd[4] = fma(v, v, sd[4]);
    store(c.o, i, c.dtype, v);
  }
  block_sum<5>(sd);
  if (threadIdx.x == 0)
    for (int j = 0; j < 5; ++j) partial[blockIdx.x * 5 + j] = sd[j];
}

__global__ void scale_kernel(const Chunk* chunks, const double* coef) {
  const double k = *coef;
  if (k >= 1.0) return;  // the clip does not bite: no traffic (a NaN coefficient bites)
  const Chunk c = chunks[blockIdx.x];
  const float kf = static_cast<float>(k);  // as stored, in fp32 maths (fp64 for fp64), as the CPU kernel
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x)
    store(c.o, i, c.dtype, c.dtype == kF64 ? load_acc(c.o, i, c.dtype) * k : static_cast<double>(static_cast<float>(load_acc(c.o, i, c.dtype)) * kf));
}

// Per-tensor sums of the partials, each tensor's chunks in order (deterministic).
__global__ void per_tensor_kernel(const double* partial, const int64_t* first_chunk, int64_t n_tensors,
                                  double* per_tensor) {
  for (int64_t t = blockIdx.x * blockDim.x + threadIdx.x; t < n_tensors; t += gridDim.x * blockDim.x) {
    double s[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c)
      for (int j = 0; j < 5; ++j) s[j] += partial[c * 5 + j];
    for (int j = 0; j < 5; ++j) per_tensor[t * 5 + j] = s[j];
  }
}

// One thread: group sums in tensor order, MMPareto weights, statistics. A group id no
// tensor uses gets neutral statistics: Gram 0, cosine 0, no conflict, weights 0.5 / 0.5.
__global__ void groups_kernel(const double* per_tensor, const int64_t* groups, int64_t n_tensors, int64_t n_groups,
                              int32_t method, double alpha, double* gram, double* cos, double* weights,
                              bool* conflict) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  for (int64_t g = 0; g < n_groups * 3; ++g) gram[g] = 0.0;
  for (int64_t g = 0; g < n_groups; ++g) conflict[g] = false;  // reused below as "has a member"
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (groups[t] < 0) continue;
    conflict[groups[t]] = true;
    for (int j = 0; j < 3; ++j) gram[groups[t] * 3 + j] += per_tensor[t * 5 + j];
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    const double AA = gram[3 * g], AB = gram[3 * g + 1], BB = gram[3 * g + 2];
    const bool used = conflict[g];
    double w = 0.5;
    if (used && !(AB > 0)) w = AB >= AA ? 0.999 : (AB >= BB ? 0.001 : (BB - AB) / (AA + BB - 2 * AB));
    const double denom = sqrt(AA) * sqrt(BB);
    cos[g] = denom == 0 ? 0.0 : AB / denom;  // NaN propagates
    conflict[g] = used && !(AB > 0);
    weights[2 * g] = method == 0 ? w : (method == 1 ? 0.0 : 1.0);
    weights[2 * g + 1] = method == 0 ? 1 - w : (method == 1 ? alpha : 1.0);
  }
}

// MMPareto per-tensor coefficients from the per-tensor Gram and the group weights.
__global__ void mmpareto_coef_kernel(const double* per_tensor, const int64_t* groups, const double* weights,
                                     int64_t n_tensors, double gamma, double* ca, double* cb) {
  for (int64_t t = blockIdx.x * blockDim.x + threadIdx.x; t < n_tensors; t += gridDim.x * blockDim.x) {
    if (groups[t] < 0) {
      ca[t] = 1.0;
      cb[t] = 1.0;
      continue;
    }
    const double w = weights[2 * groups[t]], u = weights[2 * groups[t] + 1];
    const double s = mmpareto_scale(per_tensor[t * 5], per_tensor[t * 5 + 1], per_tensor[t * 5 + 2], w, u, gamma);
    ca[t] = 2 * s * w;
    cb[t] = 2 * s * u;
  }
}

// One thread: total norm, clip coefficient, finiteness.
__global__ void finish_kernel(const double* per_tensor_gram, const double* per_tensor_out, int64_t n_tensors,
                              double max_norm, double* total_norm, double* clip, bool* all_finite) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double sq = 0.0;
  bool finite = true;
  for (int64_t t = 0; t < n_tensors; ++t) {
    sq += per_tensor_out[t * 5 + 4];
    finite &= per_tensor_gram[t * 5 + 3] == 0.0;
  }
  *total_norm = sqrt(sq);
  *clip = max_norm > 0 ? clip_coefficient(max_norm, *total_norm) : 1.0;  // keeps a NaN (fmin dropped it)
  *all_finite = finite;
}

#define MMFAST_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

Dtype dtype_code(c10::ScalarType s) {  // after check_args: one of the four
  switch (s) {
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kF32;
  }
}

// The device chunk table of a layout, cached: built once, so a warm-up call before
// CUDA-graph capture leaves no host-to-device copy inside the captured region.
struct Layout {
  std::vector<int64_t> key;
  at::Tensor chunks;       // uint8 bytes of Chunk[n_chunks]
  at::Tensor first_chunk;  // int64 [T + 1]
  int64_t n_chunks = 0;
};

const Layout& layout(at::TensorList a, at::TensorList b, at::TensorList o) {
  static std::list<Layout> cache;
  std::vector<int64_t> key;
  key.reserve(a.size() * 5 + 1);
  key.push_back(a[0].device().index());
  for (size_t i = 0; i < a.size(); ++i) {
    key.push_back(reinterpret_cast<int64_t>(a[i].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(b[i].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(o[i].data_ptr()));
    key.push_back(a[i].numel());
    key.push_back(static_cast<int64_t>(a[i].scalar_type()));
  }
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->key == key) {
      cache.splice(cache.begin(), cache, it);
      return cache.front();
    }
  }
  std::vector<Chunk> host;
  std::vector<int64_t> first{0};
  for (size_t i = 0; i < a.size(); ++i) {
    const int64_t n = a[i].numel();
    const int64_t item = a[i].element_size();
    const Dtype d = dtype_code(a[i].scalar_type());
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      host.push_back({static_cast<const char*>(a[i].data_ptr()) + begin * item,
                      static_cast<const char*>(b[i].data_ptr()) + begin * item,
                      static_cast<char*>(o[i].data_ptr()) + begin * item, std::min(kChunk, n - begin),
                      static_cast<int32_t>(i), d});
    }
    first.push_back(static_cast<int64_t>(host.size()));
  }
  Layout lay;
  lay.key = std::move(key);
  lay.n_chunks = static_cast<int64_t>(host.size());
  auto dev = at::TensorOptions().device(a[0].device());
  at::Tensor h = at::empty({static_cast<int64_t>(std::max<size_t>(host.size(), 1) * sizeof(Chunk))}, at::kByte);
  if (!host.empty()) std::memcpy(h.data_ptr(), host.data(), host.size() * sizeof(Chunk));
  lay.chunks = h.to(dev.dtype(at::kByte));
  lay.first_chunk = at::tensor(first, at::kLong).to(dev.dtype(at::kLong));
  cache.push_front(std::move(lay));
  if (cache.size() > 16) cache.pop_back();
  return cache.front();
}

}  // namespace

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats combine_cuda(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, at::IntArrayRef groups,
                   at::IntArrayRef fusion, c10::string_view method_name, double gamma, double alpha,
                   std::optional<double> max_norm) {
  int32_t method = -1;
  if (method_name == "mmpareto") method = 0;
  if (method_name == "dgl") method = 1;
  if (method_name == "sum") method = 2;
  TORCH_CHECK_VALUE(method >= 0, "method: expected one of 'mmpareto', 'dgl', 'sum', got '", std::string(method_name),
                    "'");
  const int64_t num_groups = check_args(
      {{"out", out, true}, {"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}}, groups, fusion);
  TORCH_CHECK_VALUE(out[0].is_cuda(), "backend='cuda' needs CUDA tensors, got tensors on ", out[0].device());
  const size_t n = out.size();
  c10::cuda::CUDAGuard guard(out[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Layout& lay = layout(grads_mm, grads_uni, out);
  const auto* chunks = reinterpret_cast<const Chunk*>(lay.chunks.data_ptr());
  auto f64 = at::TensorOptions().device(out[0].device()).dtype(at::kDouble);
  const int64_t T = static_cast<int64_t>(n), C = std::max<int64_t>(lay.n_chunks, 1);
  const int tensor_blocks = static_cast<int>(std::min<int64_t>((T + kThreads - 1) / kThreads, 1024));
  at::Tensor groups_d = at::tensor(std::vector<int64_t>(groups.begin(), groups.end()), at::kLong).to(f64.dtype(at::kLong));
  at::Tensor partial = at::zeros({C, 5}, f64), partial2 = at::zeros({C, 5}, f64);
  at::Tensor pt = at::empty({T, 5}, f64), pt2 = at::empty({T, 5}, f64);
  at::Tensor gram = at::empty({num_groups, 3}, f64), cos = at::empty({num_groups}, f64);
  at::Tensor weights = at::empty({num_groups, 2}, f64);
  at::Tensor conflict = at::empty({num_groups}, f64.dtype(at::kBool));
  at::Tensor ca, cb, mode;
  if (method == 0) {
    if (lay.n_chunks) gram_kernel<<<lay.n_chunks, kThreads, 0, stream>>>(chunks, partial.data_ptr<double>());
    MMFAST_LAUNCH_CHECK();
    per_tensor_kernel<<<tensor_blocks, kThreads, 0, stream>>>(partial.data_ptr<double>(),
                                                             lay.first_chunk.data_ptr<int64_t>(), T, pt.data_ptr<double>());
    MMFAST_LAUNCH_CHECK();
    groups_kernel<<<1, 1, 0, stream>>>(pt.data_ptr<double>(), groups_d.data_ptr<int64_t>(), T, num_groups, method,
                                       alpha, gram.data_ptr<double>(), cos.data_ptr<double>(),
                                       weights.data_ptr<double>(), conflict.data_ptr<bool>());
    MMFAST_LAUNCH_CHECK();
    ca = at::empty({T}, f64);
    cb = at::empty({T}, f64);
    mmpareto_coef_kernel<<<tensor_blocks, kThreads, 0, stream>>>(pt.data_ptr<double>(), groups_d.data_ptr<int64_t>(),
                                                                weights.data_ptr<double>(), T, gamma,
                                                                ca.data_ptr<double>(), cb.data_ptr<double>());
    MMFAST_LAUNCH_CHECK();
    mode = at::full({T}, static_cast<int32_t>(kAB), f64.dtype(at::kInt));
  } else {
    std::vector<double> hca(n), hcb(n);
    std::vector<int32_t> hm(n);
    for (size_t t = 0; t < n; ++t) {
      const bool fu = !fusion.empty() && fusion[t];
      if (method == 2) { hca[t] = 1; hcb[t] = 1; hm[t] = kAB; }
      else if (fu) { hca[t] = 1; hcb[t] = 0; hm[t] = kA; }
      else if (groups[t] >= 0) { hca[t] = 0; hcb[t] = alpha; hm[t] = kB; }
      else { hca[t] = 1; hcb[t] = alpha; hm[t] = kAB; }
    }
    ca = at::tensor(hca, at::kDouble).to(f64);
    cb = at::tensor(hcb, at::kDouble).to(f64);
    mode = at::tensor(hm, at::kInt).to(f64.dtype(at::kInt));
  }
  const bool with_gram = method != 0;
  if (lay.n_chunks)
    combine_kernel<<<lay.n_chunks, kThreads, 0, stream>>>(chunks, ca.data_ptr<double>(), cb.data_ptr<double>(),
                                                         mode.data_ptr<int32_t>(), with_gram,
                                                         partial2.data_ptr<double>());
  MMFAST_LAUNCH_CHECK();
  per_tensor_kernel<<<tensor_blocks, kThreads, 0, stream>>>(partial2.data_ptr<double>(),
                                                           lay.first_chunk.data_ptr<int64_t>(), T, pt2.data_ptr<double>());
  MMFAST_LAUNCH_CHECK();
  if (with_gram) {
    groups_kernel<<<1, 1, 0, stream>>>(pt2.data_ptr<double>(), groups_d.data_ptr<int64_t>(), T, num_groups, method,
                                       alpha, gram.data_ptr<double>(), cos.data_ptr<double>(),
                                       weights.data_ptr<double>(), conflict.data_ptr<bool>());
    MMFAST_LAUNCH_CHECK();
  }
  at::Tensor total = at::empty({}, f64), clip = at::empty({}, f64), finite = at::empty({}, f64.dtype(at::kBool));
  finish_kernel<<<1, 1, 0, stream>>>(with_gram ? pt2.data_ptr<double>() : pt.data_ptr<double>(),
                                     pt2.data_ptr<double>(), T, max_norm ? *max_norm : -1.0,
                                     total.data_ptr<double>(), clip.data_ptr<double>(), finite.data_ptr<bool>());
  MMFAST_LAUNCH_CHECK();
  if (max_norm && lay.n_chunks) {
    scale_kernel<<<lay.n_chunks, kThreads, 0, stream>>>(chunks, clip.data_ptr<double>());
    MMFAST_LAUNCH_CHECK();
  }
  return {gram, cos, weights, conflict, total, clip, finite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_cuda(at::TensorList grads, at::IntArrayRef groups,
                                                                     std::optional<double> max_norm) {
  const int64_t num_groups = check_args({{"grads", grads, true}}, groups, {});
  TORCH_CHECK_VALUE(grads[0].is_cuda(), "backend='cuda' needs CUDA tensors, got tensors on ", grads[0].device());
  const size_t n = grads.size();
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Layout& lay = layout(grads, grads, grads);
  const auto* chunks = reinterpret_cast<const Chunk*>(lay.chunks.data_ptr());
  auto f64 = at::TensorOptions().device(grads[0].device()).dtype(at::kDouble);
  const int64_t T = static_cast<int64_t>(n), C = std::max<int64_t>(lay.n_chunks, 1);
  const int tensor_blocks = static_cast<int>(std::min<int64_t>((T + kThreads - 1) / kThreads, 1024));
  at::Tensor partial = at::zeros({C, 5}, f64), pt = at::empty({T, 5}, f64);
  if (lay.n_chunks) gram_kernel<<<lay.n_chunks, kThreads, 0, stream>>>(chunks, partial.data_ptr<double>());
  MMFAST_LAUNCH_CHECK();
  per_tensor_kernel<<<tensor_blocks, kThreads, 0, stream>>>(partial.data_ptr<double>(),
                                                           lay.first_chunk.data_ptr<int64_t>(), T, pt.data_ptr<double>());
  MMFAST_LAUNCH_CHECK();
  // Squared norms sit in column 0 (aa); the total and the per-group sums are tiny reductions.
  at::Tensor sq = pt.select(1, 0);
  at::Tensor groups_d = at::tensor(std::vector<int64_t>(groups.begin(), groups.end()), at::kLong).to(f64.dtype(at::kLong));
  at::Tensor group_sq = at::zeros({num_groups}, f64);
  for (int64_t g = 0; g < num_groups; ++g) group_sq[g] = at::where(groups_d == g, sq, 0.0).sum();
  at::Tensor total = sq.sum().sqrt();
  at::Tensor clip = max_norm ? (*max_norm / (total + 1e-6)).clamp_max(1.0) : at::ones({}, f64);
  if (max_norm && lay.n_chunks) {
    scale_kernel<<<lay.n_chunks, kThreads, 0, stream>>>(chunks, clip.data_ptr<double>());
    MMFAST_LAUNCH_CHECK();
  }
  at::Tensor finite = (pt.select(1, 3) == 0).all();
  return {group_sq, total, clip, finite};
}

}  // namespace mmfast::cuda

namespace mmfast {
bool cuda_built() { return true; }
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("combine_", &mmfast::cuda::combine_cuda);
  m.impl("clip_", &mmfast::cuda::clip_cuda);
}
