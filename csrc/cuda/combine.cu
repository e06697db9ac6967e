// The CUDA backend of mmfast::combine_, its two passes (mmfast::gram_,
// mmfast::combine_pass_) and mmfast::clip_.
//
// Written like ATen's foreach kernels (multi-tensor apply): a chunk table (pointers,
// length, tensor, group, role) on the device, one block per chunk of kChunk elements,
// 16-byte vector loads and stores where the tensor is 16-byte aligned (a scalar loop
// otherwise, and for the tail), kILP vectors in flight per thread.
//
// Once per layout (csrc/args.h, LayoutCache): the argument checks, the chunk table and
// the group tables (members of each group in tensor order), copied to the device once.
// Per call: only kernel launches with scalars passed by value, and device-side maths
// (weights, coefficients, norms, statistics); nothing is read back to the host, so the
// op can be captured in a CUDA graph once its layout has been seen (a first call, as
// every capture's warm-up does).
//
// Precision (SEMANTICS.md): values load in fp32 (fp64 stays fp64); the Gram products
// and every sum are fp64 (fp32 products are exact in fp64: the zero rule and strong
// conflict need it; a data-centre GPU's fp64 rate is far above what the memory feeds);
// out = ca a + cb b with fp64 coefficients, rounded once through fp32 to the storage
// type; the clip rescale in fp32 (fp64 for fp64), as torch's clip_grad_norm_. Block
// and per-tensor reductions run in a fixed order: the same bits on every run.
//
// Launches per call: mmpareto 4 (gram, weights, combine, finish), dgl/sum 2 (combine,
// finish), +1 (scale) with max_norm; clip_ 2 (+1 when clipping); gram_ 2; combine_pass_ 3.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../args.h"
#include "../precision.h"

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;         // per chunk block
constexpr int kFinishThreads = 1024;  // the single-block kernels
constexpr int kILP = 4;               // 16-byte vectors in flight per thread
constexpr int kMinBlocks = 2;         // chunk blocks per SM: <= 128 registers, no spill (4 spills)
enum Dtype : int8_t { kF32, kF64, kBF16, kF16 };
enum Role : int8_t { kOutside, kEncoder, kFusion };  // DGL: a + alpha b, alpha b, a
enum Method : int32_t { kMMPareto, kDGL, kSum };

struct Chunk {  // 40 bytes
  const void* a;
  const void* b;
  void* o;
  int32_t n;       // elements, <= kChunk
  int32_t tensor;  // index in the lists
  int32_t group;   // -1 outside every group
  int8_t dtype;
  int8_t role;
  int8_t aligned;  // a, b and o all 16-byte aligned: vector loads
  int8_t same;     // a and b are the same memory (clip_): read once
};
static_assert(kChunk <= (int64_t{1} << 30), "chunk lengths are int32");

// ------------------------------------------------------------ element access

template <typename T> struct Math { using type = float; };  // the type values load into
template <> struct Math<double> { using type = double; };

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounded once, through fp32 for the 16-bit types (as the CPU kernels and torch's casts).
template <typename T> __device__ __forceinline__ T from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ double from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_double<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}
template <typename T> __device__ __forceinline__ T from_math(typename Math<T>::type v) { return from_double<T>(v); }
template <> __device__ __forceinline__ float from_math<float>(float v) { return v; }

template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};
template <typename T> __device__ __forceinline__ Vec<T> load_vec(const void* p, int64_t vi) {
  Vec<T> r;
  const uint4 raw = reinterpret_cast<const uint4*>(p)[vi];  // one 16-byte load
  memcpy(&r, &raw, 16);
  return r;
}
template <typename T> __device__ __forceinline__ void store_vec(void* p, int64_t vi, const Vec<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, 16);
  reinterpret_cast<uint4*>(p)[vi] = raw;
}

// ------------------------------------------------------------ reductions

// Sums K fp64 values over the block into thread 0, in a fixed order (warp trees, then
// the warps in order).
template <int K, int kBlock>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  __shared__ double smem[K][kBlock / 32];
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < K; ++j) smem[j][warp] = v[j];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      double s = 0;
      for (int w = 0; w < kBlock / 32; ++w) s += smem[j][w];
      v[j] = s;
    }
  }
}

// ------------------------------------------------------------ pass 1: the Gram

template <typename T>
__device__ __forceinline__ void gram_chunk(const Chunk& c, double (&s)[3], typename Math<T>::type& z) {
  using M = typename Math<T>::type;
  constexpr int N = Vec<T>::N;
  auto add = [&](M x, M y) {
    const double xd = x, yd = y;
    s[0] = fma(xd, xd, s[0]);
    s[1] = fma(xd, yd, s[1]);
    s[2] = fma(yd, yd, s[2]);
    z += (x - x) + (y - y);  // 0 for finite values, NaN otherwise
  };
  int64_t head = 0;
  if (c.aligned) {
    const int64_t nv = c.n / N;
    for (int64_t base = threadIdx.x; base < nv; base += int64_t{kThreads} * kILP) {
      Vec<T> xa[kILP], yb[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const int64_t vi = base + int64_t{k} * kThreads;
        if (vi < nv) {
          xa[k] = load_vec<T>(c.a, vi);
          yb[k] = c.same ? xa[k] : load_vec<T>(c.b, vi);
        }
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k)
        if (base + int64_t{k} * kThreads < nv)
#pragma unroll
          for (int e = 0; e < N; ++e) add(to_math(xa[k].v[e]), to_math(yb[k].v[e]));
    }
    head = nv * N;
  }
  const T* a = static_cast<const T*>(c.a);
  const T* b = static_cast<const T*>(c.b);
  for (int64_t i = head + threadIdx.x; i < c.n; i += kThreads) add(to_math(a[i]), to_math(b[i]));
}

// partial[c] = (aa, ab, bb, 1 if a value read was not finite) over chunk c.
__global__ void __launch_bounds__(kThreads, kMinBlocks) gram_kernel(const Chunk* __restrict__ chunks, double* __restrict__ partial) {
  const Chunk c = chunks[blockIdx.x];
  double s[3] = {0.0, 0.0, 0.0};
  bool bad;
  if (c.dtype == kF64) {
    double z = 0;
    gram_chunk<double>(c, s, z);
    bad = z != 0;
  } else {
    float z = 0;
    if (c.dtype == kF32) gram_chunk<float>(c, s, z);
    else if (c.dtype == kBF16) gram_chunk<__nv_bfloat16>(c, s, z);
    else gram_chunk<__half>(c, s, z);
    bad = z != 0;
  }
  bad = __syncthreads_or(bad);
  block_sum<3, kThreads>(s);
  if (threadIdx.x == 0) {
    double* p = partial + 4 * int64_t{blockIdx.x};
    p[0] = s[0];
    p[1] = s[1];
    p[2] = s[2];
    p[3] = bad ? 1.0 : 0.0;
  }
}

// ------------------------------------------------------------ pass 2: the combine

// The coefficients of chunk c's tensor: MMPareto's from its Gram and its group's
// weights (each block of the tensor computes the same value), DGL's and "sum"'s from its
// role. mode: 0 ca a + cb b, 1 ca a alone, 2 cb b alone (the dropped input is not read).
__device__ __forceinline__ void coefficients(const Chunk& c, int32_t method, const double* pt, const double* weights,
                                             double gamma, double alpha, double& ca, double& cb, int& mode) {
  mode = 0;
  ca = 1.0;
  cb = 1.0;
  if (method == kMMPareto) {
    if (c.group >= 0) {
      const double w = weights[2 * c.group], u = weights[2 * c.group + 1];
      const double* g = pt + 4 * int64_t{c.tensor};
      const double s = mmpareto_scale(g[0], g[1], g[2], w, u, gamma);
      ca = 2 * s * w;
      cb = 2 * s * u;
    }
  } else if (method == kDGL) {
    if (c.role == kFusion) { cb = 0.0; mode = 1; }
    else if (c.role == kEncoder) { ca = 0.0; cb = alpha; mode = 2; }
    else cb = alpha;
  }
}

template <typename T, bool G>
__device__ __forceinline__ void combine_chunk(const Chunk& c, double ca, double cb, int mode, double (&s)[4],
                                              typename Math<T>::type& z) {
  using M = typename Math<T>::type;
  constexpr int N = Vec<T>::N;
  const bool read_a = mode != 2 || G, read_b = mode != 1 || G;
  auto one = [&](M x, M y) -> T {
    const double xd = x, yd = y;
    const double v = (mode == 2 ? 0.0 : ca * xd) + (mode == 1 ? 0.0 : cb * yd);
    s[0] = fma(v, v, s[0]);
    if (G) {
      s[1] = fma(xd, xd, s[1]);
      s[2] = fma(xd, yd, s[2]);
      s[3] = fma(yd, yd, s[3]);
    }
    z += (read_a ? x - x : M(0)) + (read_b ? y - y : M(0));
    return from_double<T>(v);
  };
  int64_t head = 0;
  if (c.aligned) {
    const int64_t nv = c.n / N;
    for (int64_t base = threadIdx.x; base < nv; base += int64_t{kThreads} * kILP) {
      Vec<T> xa[kILP], yb[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const int64_t vi = base + int64_t{k} * kThreads;
        if (vi < nv) {
#pragma unroll
          for (int e = 0; e < N; ++e) xa[k].v[e] = yb[k].v[e] = from_math<T>(0);
          if (read_a) xa[k] = load_vec<T>(c.a, vi);
          if (read_b) yb[k] = load_vec<T>(c.b, vi);
        }
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const int64_t vi = base + int64_t{k} * kThreads;
        if (vi < nv) {
          Vec<T> r;
#pragma unroll
          for (int e = 0; e < N; ++e) r.v[e] = one(to_math(xa[k].v[e]), to_math(yb[k].v[e]));
          store_vec<T>(c.o, vi, r);
        }
      }
    }
    head = nv * N;
  }
  const T* a = static_cast<const T*>(c.a);
  const T* b = static_cast<const T*>(c.b);
  T* o = static_cast<T*>(c.o);
  for (int64_t i = head + threadIdx.x; i < c.n; i += kThreads)
    o[i] = one(read_a ? to_math(a[i]) : M(0), read_b ? to_math(b[i]) : M(0));
}

template <bool G>
__device__ __forceinline__ void combine_dispatch(const Chunk& c, double ca, double cb, int mode, double (&s)[4],
                                                 bool& bad) {
  if (c.dtype == kF64) {
    double z = 0;
    combine_chunk<double, G>(c, ca, cb, mode, s, z);
    bad = z != 0;
  } else {
    float z = 0;
    if (c.dtype == kF32) combine_chunk<float, G>(c, ca, cb, mode, s, z);
    else if (c.dtype == kBF16) combine_chunk<__nv_bfloat16, G>(c, ca, cb, mode, s, z);
    else combine_chunk<__half, G>(c, ca, cb, mode, s, z);
    bad = z != 0;
  }
}

// partial[c] = (<out,out>, aa, ab, bb, 1 if not finite) over chunk c; the Gram columns
// only with_gram ("dgl", "sum": their one pass).
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    combine_kernel(const Chunk* __restrict__ chunks, int32_t method, const double* __restrict__ pt,
                   const double* __restrict__ weights, double gamma, double alpha, bool with_gram,
                   double* __restrict__ partial) {
  const Chunk c = chunks[blockIdx.x];
  double ca, cb;
  int mode;
  coefficients(c, method, pt, weights, gamma, alpha, ca, cb, mode);
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  bool bad = false;
  if (with_gram) combine_dispatch<true>(c, ca, cb, mode, s, bad);
  else combine_dispatch<false>(c, ca, cb, mode, s, bad);
  bad = __syncthreads_or(bad);
  block_sum<4, kThreads>(s);
  if (threadIdx.x == 0) {
    double* p = partial + 5 * int64_t{blockIdx.x};
    for (int j = 0; j < 4; ++j) p[j] = s[j];
    p[4] = bad ? 1.0 : 0.0;
  }
}

// ------------------------------------------------------------ the clip rescale

template <typename T>
__device__ __forceinline__ void scale_chunk(const Chunk& c, typename Math<T>::type k) {
  constexpr int N = Vec<T>::N;
  int64_t head = 0;
  if (c.aligned) {
    const int64_t nv = c.n / N;
    for (int64_t vi = threadIdx.x; vi < nv; vi += kThreads) {
      Vec<T> x = load_vec<T>(c.o, vi);
#pragma unroll
      for (int e = 0; e < N; ++e) x.v[e] = from_math<T>(to_math(x.v[e]) * k);
      store_vec<T>(c.o, vi, x);
    }
    head = nv * N;
  }
  T* o = static_cast<T*>(c.o);
  for (int64_t i = head + threadIdx.x; i < c.n; i += kThreads) o[i] = from_math<T>(to_math(o[i]) * k);
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const Chunk* __restrict__ chunks, const double* coef) {
  const double k = *coef;
  if (k >= 1.0) return;  // the clip does not bite: no traffic (a NaN coefficient bites)
  const Chunk c = chunks[blockIdx.x];
  const float kf = static_cast<float>(k);  // the maths type, as torch's clip_grad_norm_
  if (c.dtype == kF64) scale_chunk<double>(c, k);
  else if (c.dtype == kF32) scale_chunk<float>(c, kf);
  else if (c.dtype == kBF16) scale_chunk<__nv_bfloat16>(c, kf);
  else scale_chunk<__half>(c, kf);
}

// ------------------------------------------------------------ single-block kernels

// The group tables of a layout: meta = [first_chunk (T + 1), members (M), group_start (G + 1)].
struct Tables {
  const int32_t* first_chunk;
  const int32_t* members;  // tensors of group 0 in tensor order, then of group 1, ...
  const int32_t* group_start;
  int32_t T, G;
};

// pt[t][j] = sum of partial[c][col[j]] over tensor t's chunks, in chunk order (j < 4;
// column 3 is the non-finite flag, kept 0/1).
__device__ void per_tensor(const double* partial, int pcols, const int (&col)[4], const Tables& tb, double* pt) {
  for (int t = threadIdx.x; t < tb.T; t += blockDim.x) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (int c = tb.first_chunk[t]; c < tb.first_chunk[t + 1]; ++c)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j] += partial[int64_t{c} * pcols + col[j]];
#pragma unroll
    for (int j = 0; j < 3; ++j) pt[4 * t + j] = s[j];
    pt[4 * t + 3] = s[3] != 0 ? 1.0 : 0.0;
  }
}

// Per group (a warp each, members in a fixed order): the Gram, MMPareto's weights (or
// the method's fixed ones), the cosine and the conflict flag. A group id no tensor uses
// gets neutral statistics: Gram 0, cosine 0, no conflict, weights 0.5 / 0.5.
__device__ void group_stats(const double* pt, const Tables& tb, int32_t method, double alpha, double* gram,
                            double* cos, double* weights, bool* conflict) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int g = warp; g < tb.G; g += warps) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int k = tb.group_start[g] + lane; k < tb.group_start[g + 1]; k += 32)
#pragma unroll
      for (int j = 0; j < 3; ++j) s[j] += pt[4 * tb.members[k] + j];
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s[j] += __shfl_down_sync(0xffffffffu, s[j], off);
    if (lane == 0) {
      const double AA = s[0], AB = s[1], BB = s[2];
      const bool clash = tb.group_start[g + 1] > tb.group_start[g] && !(AB > 0);  // NaN: a conflict
      double w = 0.5;
      if (clash) w = AB >= AA ? 0.999 : (AB >= BB ? 0.001 : (BB - AB) / (AA + BB - 2 * AB));
      gram[3 * g] = AA;
      gram[3 * g + 1] = AB;
      gram[3 * g + 2] = BB;
      weights[2 * g] = method == kMMPareto ? w : (method == kSum ? 1.0 : 0.0);
      weights[2 * g + 1] = method == kMMPareto ? 1 - w : (method == kSum ? 1.0 : alpha);
      const double denom = sqrt(AA) * sqrt(BB);
      cos[g] = denom == 0 ? 0.0 : AB / denom;  // NaN propagates
      conflict[g] = clash;
    }
  }
}

// Sum of v[t] over t (each thread its tensors in order, then the fixed block tree) into
// thread 0, and whether any flag[4 t + 3] is set (to every thread).
__device__ void total(const double* v, int stride, const double* flags, int T, double& sum, bool& bad) {
  double s[1] = {0.0};
  bool b = false;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    s[0] += v[int64_t{t} * stride];
    b |= flags[4 * t + 3] != 0;
  }
  bad = __syncthreads_or(b);
  block_sum<1, kFinishThreads>(s);
  sum = s[0];
}

// After the Gram pass (MMPareto), or on given per-tensor sums (combine_pass_: from_partial
// false): per-tensor sums into pt, then the group statistics and weights.
__global__ void __launch_bounds__(kFinishThreads)
    weights_kernel(const double* partial, bool from_partial, Tables tb, int32_t method, double alpha, double* pt,
                   double* gram, double* cos, double* weights, bool* conflict) {
  if (from_partial) {
    per_tensor(partial, 4, {0, 1, 2, 3}, tb, pt);
    __syncthreads();
  }
  group_stats(pt, tb, method, alpha, gram, cos, weights, conflict);
}

// After the combine pass: per-tensor <out,out> into out_sq (and, with_gram, the Gram into
// pt and the group statistics), the total norm, clip coefficient and finiteness.
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const double* partial, Tables tb, bool with_gram, int32_t method, double alpha, double max_norm,
                  double* pt, double* out_sq, double* gram, double* cos, double* weights, bool* conflict,
                  double* total_norm, double* clip, bool* all_finite) {
  for (int t = threadIdx.x; t < tb.T; t += blockDim.x) {
    double s = 0.0, bad = 0.0;
    for (int c = tb.first_chunk[t]; c < tb.first_chunk[t + 1]; ++c) {
      s += partial[5 * int64_t{c}];
      bad += partial[5 * int64_t{c} + 4];
    }
    out_sq[t] = s;
    if (with_gram) pt[4 * t + 3] = bad != 0 ? 1.0 : 0.0;
  }
  if (with_gram) {
    const int col[4] = {1, 2, 3, 4};
    for (int t = threadIdx.x; t < tb.T; t += blockDim.x) {  // columns 0..2 (3 set above)
      double s[3] = {0.0, 0.0, 0.0};
      for (int c = tb.first_chunk[t]; c < tb.first_chunk[t + 1]; ++c)
        for (int j = 0; j < 3; ++j) s[j] += partial[5 * int64_t{c} + col[j]];
      for (int j = 0; j < 3; ++j) pt[4 * t + j] = s[j];
    }
  }
  __syncthreads();
  if (with_gram) group_stats(pt, tb, method, alpha, gram, cos, weights, conflict);
  double sq;
  bool bad;
  total(out_sq, 1, pt, tb.T, sq, bad);
  if (threadIdx.x == 0) {
    *total_norm = sqrt(sq);
    *clip = max_norm > 0 ? clip_coefficient(max_norm, *total_norm) : 1.0;  // keeps a NaN
    *all_finite = !bad;
  }
}

// clip_: per-tensor squared norms from the Gram pass (a = b), per-group sums, the total,
// the clip coefficient, finiteness.
__global__ void __launch_bounds__(kFinishThreads)
    clip_finish_kernel(const double* partial, Tables tb, double max_norm, double* pt, double* group_sq,
                       double* total_norm, double* clip, bool* all_finite) {
  per_tensor(partial, 4, {0, 1, 2, 3}, tb, pt);
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int g = warp; g < tb.G; g += warps) {
    double s = 0.0;
    for (int k = tb.group_start[g] + lane; k < tb.group_start[g + 1]; k += 32) s += pt[4 * tb.members[k]];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) group_sq[g] = s;
  }
  double sq;
  bool bad;
  total(pt, 4, pt, tb.T, sq, bad);
  if (threadIdx.x == 0) {
    *total_norm = sqrt(sq);
    *clip = max_norm > 0 ? clip_coefficient(max_norm, *total_norm) : 1.0;
    *all_finite = !bad;
  }
}

// ------------------------------------------------------------ layouts (host)

int8_t dtype_code(c10::ScalarType s) {  // after check_args: one of the four
  switch (s) {
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kF32;
  }
}

// What a layout fixes, on the device (see csrc/args.h for the cache's policy).
struct CudaLayout : CachedLayout {
  at::Tensor table;  // uint8: Chunk[n_chunks]
  at::Tensor meta;   // int32: first_chunk [T + 1], members [M], group_start [G + 1]
  int64_t n_chunks = 0, T = 0, M = 0;
  c10::StreamId stream = 0;  // where the tables were copied

  Tables tables() const {
    const int32_t* m = meta.const_data_ptr<int32_t>();
    return {m, m + T + 1, m + T + 1 + M, static_cast<int32_t>(T), static_cast<int32_t>(num_groups)};
  }
  const Chunk* chunks() const { return reinterpret_cast<const Chunk*>(table.const_data_ptr()); }
};

LayoutCache<CudaLayout>& cuda_cache() {
  static LayoutCache<CudaLayout> c(64);
  return c;
}

// The cached layout of a call on the current device and stream (built, the arguments
// checked and the tables copied to the device on a miss). lists[ia], lists[ib] are read,
// lists[io] written (io = -1: none).
std::shared_ptr<CudaLayout> cuda_layout(int64_t op, const std::vector<NamedList>& lists, at::IntArrayRef groups,
                                        at::IntArrayRef fusion, int ia, int ib, int io) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  auto lay = cuda_cache().get(layout_key(op, lists, groups, fusion), [&] {
    const int64_t num_groups = check_args(lists, groups, fusion);
    TORCH_CHECK_VALUE(lists[0].tensors[0].is_cuda(), "backend='cuda' needs CUDA tensors, got tensors on ",
                      lists[0].tensors[0].device());
    TORCH_CHECK(!capturing,
                "mmfast: first call with these tensors inside a CUDA-graph capture: run the op once before capturing "
                "(its layout tables are built and copied to the device on the first call with a layout; "
                "torch.cuda.graph's usual warm-up does this)");
    auto l = std::make_shared<CudaLayout>();
    l->num_groups = num_groups;
    const size_t n = lists[0].tensors.size();
    const at::TensorList a = lists[ia].tensors, b = lists[ib].tensors;
    std::vector<Chunk> host;
    std::vector<int32_t> meta{0};
    std::vector<std::vector<int32_t>> members(num_groups);
    for (size_t i = 0; i < n; ++i) {
      const int64_t numel = a[i].numel(), item = a[i].element_size();
      const char* pa = static_cast<const char*>(a[i].const_data_ptr());
      const char* pb = static_cast<const char*>(b[i].const_data_ptr());
      char* po = io >= 0 ? static_cast<char*>(lists[io].tensors[i].data_ptr()) : nullptr;
      const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
      const bool aligned = aligned16(pa) && aligned16(pb) && (po == nullptr || aligned16(po));
      const int8_t role = !fusion.empty() && fusion[i] ? kFusion : (groups[i] >= 0 ? kEncoder : kOutside);
      for (int64_t begin = 0; begin < numel; begin += kChunk) {
        const int64_t off = begin * item;  // kChunk * item is a multiple of 16: alignment carries over
        host.push_back({pa + off, pb + off, po ? po + off : nullptr, static_cast<int32_t>(std::min(kChunk, numel - begin)),
                        static_cast<int32_t>(i), static_cast<int32_t>(groups[i]), dtype_code(a[i].scalar_type()), role,
                        static_cast<int8_t>(aligned), static_cast<int8_t>(pa == pb)});
      }
      TORCH_CHECK(host.size() < (size_t{1} << 31), "mmfast: more than 2^31 chunks");
      meta.push_back(static_cast<int32_t>(host.size()));
      if (groups[i] >= 0) members[groups[i]].push_back(static_cast<int32_t>(i));
    }
    std::vector<int32_t> starts{0};
    for (const auto& m : members) {
      meta.insert(meta.end(), m.begin(), m.end());
      starts.push_back(starts.back() + static_cast<int32_t>(m.size()));
    }
    l->M = starts.back();
    meta.insert(meta.end(), starts.begin(), starts.end());
    l->n_chunks = static_cast<int64_t>(host.size());
    l->T = static_cast<int64_t>(n);
    const auto dev = at::TensorOptions().device(lists[0].tensors[0].device());
    at::Tensor h = at::empty({static_cast<int64_t>(std::max<size_t>(host.size(), 1) * sizeof(Chunk))}, at::kByte);
    if (!host.empty()) std::memcpy(h.data_ptr(), host.data(), host.size() * sizeof(Chunk));
    l->table = h.to(dev.dtype(at::kByte));  // synchronous copies, once per layout
    l->meta = at::from_blob(meta.data(), {static_cast<int64_t>(meta.size())}, at::kInt).to(dev.dtype(at::kInt));
    l->stream = stream.id();
    return l;
  });
  if (stream.id() != lay->stream) {
    // Used on another stream than the one its tables were made on: tell the caching
    // allocator, so freeing them (eviction) waits for this stream's queued kernels.
    c10::cuda::CUDACachingAllocator::recordStream(lay->table.storage().data_ptr(), stream);
    c10::cuda::CUDACachingAllocator::recordStream(lay->meta.storage().data_ptr(), stream);
  }
  if (capturing) lay->pinned = true;  // a graph replays these table pointers: never evict
  return lay;
}

int32_t parse_method(c10::string_view m) {
  if (m == "mmpareto") return kMMPareto;
  if (m == "dgl") return kDGL;
  if (m == "sum") return kSum;
  TORCH_CHECK_VALUE(false, "method: expected one of 'mmpareto', 'dgl', 'sum', got '", std::string(m), "'");
}

std::vector<NamedList> combine_lists(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni) {
  return {{"out", out, true}, {"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}};
}

// One allocation for a call's statistics: views of one fp64 buffer and one bool buffer.
struct StatsOut {
  at::Tensor gram, cos, weights, conflict, total, clip, finite;
  StatsOut(int64_t G, const at::TensorOptions& f64) {
    at::Tensor d = at::empty({6 * G + 2}, f64);
    at::Tensor b = at::empty({G + 1}, f64.dtype(at::kBool));
    gram = d.narrow(0, 0, 3 * G).view({G, 3});
    cos = d.narrow(0, 3 * G, G);
    weights = d.narrow(0, 4 * G, 2 * G).view({G, 2});
    total = d.select(0, 6 * G);
    clip = d.select(0, 6 * G + 1);
    conflict = b.narrow(0, 0, G);
    finite = b.select(0, G);
  }
};

}  // namespace

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats combine_cuda(at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, at::IntArrayRef groups,
                   at::IntArrayRef fusion, c10::string_view method_name, double gamma, double alpha,
                   std::optional<double> max_norm) {
  const int32_t method = parse_method(method_name);
  TORCH_CHECK_VALUE(!out.empty(), "out: expected at least one tensor, got an empty list");
  c10::cuda::OptionalCUDAGuard guard(out[0].device());
  const auto lay = cuda_layout(kOpCombine, combine_lists(out, grads_mm, grads_uni), groups, fusion, 1, 2, 0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = at::TensorOptions().device(out[0].device()).dtype(at::kDouble);
  const int64_t C = lay->n_chunks, T = lay->T, G = lay->num_groups;
  // Workspace: Gram partials [C, 4], combine partials [C, 5], per tensor [T, 4] and out_sq [T].
  at::Tensor ws = at::empty({9 * std::max<int64_t>(C, 1) + 5 * T}, f64);
  double* p1 = ws.data_ptr<double>();
  double* p2 = p1 + 4 * std::max<int64_t>(C, 1);
  double* pt = p2 + 5 * std::max<int64_t>(C, 1);
  double* out_sq = pt + 4 * T;
  StatsOut s(G, f64);
  const Tables tb = lay->tables();
  double* W = s.weights.data_ptr<double>();
  if (method == kMMPareto) {
    if (C) gram_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), p1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    weights_kernel<<<1, kFinishThreads, 0, stream>>>(p1, C > 0, tb, method, alpha, pt, s.gram.data_ptr<double>(),
                                                     s.cos.data_ptr<double>(), W, s.conflict.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const bool with_gram = method != kMMPareto;
  if (C)
    combine_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), method, pt, W, gamma, alpha, with_gram, p2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(p2, tb, with_gram, method, alpha, max_norm ? *max_norm : -1.0, pt,
                                                  out_sq, s.gram.data_ptr<double>(), s.cos.data_ptr<double>(), W,
                                                  s.conflict.data_ptr<bool>(), s.total.data_ptr<double>(),
                                                  s.clip.data_ptr<double>(), s.finite.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (max_norm && C) {
    scale_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), s.clip.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {s.gram, s.cos, s.weights, s.conflict, s.total, s.clip, s.finite};
}

// combine_'s first pass: per-tensor [T, 4] fp64 (aa, ab, bb, 1 if non-finite).
at::Tensor gram_cuda(at::TensorList grads_mm, at::TensorList grads_uni) {
  TORCH_CHECK_VALUE(!grads_mm.empty(), "grads_mm: expected at least one tensor, got an empty list");
  c10::cuda::OptionalCUDAGuard guard(grads_mm[0].device());
  const std::vector<int64_t> outside(grads_mm.size(), -1);
  const auto lay =
      cuda_layout(kOpGram, {{"grads_mm", grads_mm, false}, {"grads_uni", grads_uni, false}}, outside, {}, 0, 1, -1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = at::TensorOptions().device(grads_mm[0].device()).dtype(at::kDouble);
  const int64_t C = lay->n_chunks;
  at::Tensor partial = at::empty({std::max<int64_t>(C, 1), 4}, f64);
  at::Tensor pt = at::empty({lay->T, 4}, f64);
  if (C) gram_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  weights_kernel<<<1, kFinishThreads, 0, stream>>>(partial.data_ptr<double>(), true, lay->tables(), kMMPareto, 0.0,
                                                   pt.data_ptr<double>(), nullptr, nullptr, nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pt;
}

// combine_'s second pass (MMPareto) from given per-tensor sums: see csrc/cpu/combine.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> combine_pass_cuda(
    at::TensorList out, at::TensorList grads_mm, at::TensorList grads_uni, const at::Tensor& per_tensor,
    at::IntArrayRef groups, double gamma) {
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0, "gamma: expected a finite positive number, got ", gamma);
  TORCH_CHECK_VALUE(!out.empty(), "out: expected at least one tensor, got an empty list");
  c10::cuda::OptionalCUDAGuard guard(out[0].device());
  const auto lay = cuda_layout(kOpCombine, combine_lists(out, grads_mm, grads_uni), groups, {}, 1, 2, 0);
  const int64_t C = lay->n_chunks, T = lay->T, G = lay->num_groups;
  TORCH_CHECK_VALUE(per_tensor.scalar_type() == at::kDouble && per_tensor.dim() == 2 && per_tensor.size(0) == T &&
                        per_tensor.size(1) == 4 && per_tensor.is_contiguous() && per_tensor.device() == out[0].device(),
                    "per_tensor: expected a contiguous float64 tensor of shape (", T, ", 4) on ", out[0].device(),
                    ", got ", per_tensor.scalar_type(), " ", per_tensor.sizes(), " on ", per_tensor.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = at::TensorOptions().device(out[0].device()).dtype(at::kDouble);
  at::Tensor pt = per_tensor.clone();  // finish_kernel writes its scratch there
  at::Tensor ws = at::empty({5 * std::max<int64_t>(C, 1) + T}, f64);
  double* p2 = ws.data_ptr<double>();
  double* out_sq = p2 + 5 * std::max<int64_t>(C, 1);
  StatsOut s(G, f64);
  double* W = s.weights.data_ptr<double>();
  const Tables tb = lay->tables();
  weights_kernel<<<1, kFinishThreads, 0, stream>>>(nullptr, false, tb, kMMPareto, 0.0, pt.data_ptr<double>(),
                                                   s.gram.data_ptr<double>(), s.cos.data_ptr<double>(), W,
                                                   s.conflict.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (C)
    combine_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), kMMPareto, pt.data_ptr<double>(), W, gamma, 0.0, false,
                                               p2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(p2, tb, false, kMMPareto, 0.0, -1.0, pt.data_ptr<double>(), out_sq,
                                                  nullptr, nullptr, nullptr, nullptr, s.total.data_ptr<double>(),
                                                  s.clip.data_ptr<double>(), s.finite.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s.gram, s.cos, s.weights, s.conflict, ws.narrow(0, 5 * std::max<int64_t>(C, 1), T)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_cuda(at::TensorList grads, at::IntArrayRef groups,
                                                                     std::optional<double> max_norm) {
  TORCH_CHECK_VALUE(!max_norm || (std::isfinite(*max_norm) && *max_norm > 0),
                    "max_norm: expected a finite positive number, got ", *max_norm);
  TORCH_CHECK_VALUE(!grads.empty(), "grads: expected at least one tensor, got an empty list");
  c10::cuda::OptionalCUDAGuard guard(grads[0].device());
  const auto lay = cuda_layout(kOpClip, {{"grads", grads, true}}, groups, {}, 0, 0, 0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = at::TensorOptions().device(grads[0].device()).dtype(at::kDouble);
  const int64_t C = lay->n_chunks, T = lay->T, G = lay->num_groups;
  at::Tensor ws = at::empty({4 * std::max<int64_t>(C, 1) + 4 * T}, f64);
  at::Tensor d = at::empty({G + 2}, f64);
  at::Tensor finite = at::empty({}, f64.dtype(at::kBool));
  double* partial = ws.data_ptr<double>();
  at::Tensor group_sq = d.narrow(0, 0, G), total = d.select(0, G), clip = d.select(0, G + 1);
  if (C) gram_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  clip_finish_kernel<<<1, kFinishThreads, 0, stream>>>(partial, lay->tables(), max_norm ? *max_norm : -1.0,
                                                       partial + 4 * std::max<int64_t>(C, 1),
                                                       group_sq.data_ptr<double>(), total.data_ptr<double>(),
                                                       clip.data_ptr<double>(), finite.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (max_norm && C) {
    scale_kernel<<<C, kThreads, 0, stream>>>(lay->chunks(), clip.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {group_sq, total, clip, finite};
}

}  // namespace mmfast::cuda

namespace mmfast {
bool cuda_built() { return true; }
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("combine_", &mmfast::cuda::combine_cuda);
  m.impl("clip_", &mmfast::cuda::clip_cuda);
  m.impl("gram_", &mmfast::cuda::gram_cuda);
  m.impl("combine_pass_", &mmfast::cuda::combine_pass_cuda);
}
