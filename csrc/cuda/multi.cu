// K objectives on CUDA tensors: mmfast::gram_k, mmfast::combine_k_ and mmfast::aggregate_k_
// (csrc/cpu/multi.cpp has the contract). One block per chunk of kChunk elements of one
// tensor; each chunk's partial sums go to a buffer, and the last block of a tensor to
// finish (a counter per tensor) adds that tensor's partials in chunk order: deterministic,
// no second pass, no host sync.
//
// Metadata: passed by value in the launch, as ATen's multi-tensor apply does (a Batch of
// at most 4 KB: pointers, sizes and first chunks of up to kSlots tensors; more tensors, more
// launches). Nothing is copied from the host, no table is cached (so none can be freed
// while a queued kernel reads it), and a captured CUDA graph replays with the same buffers.
//
// Arithmetic: the contract's (csrc/cpu/multi.cpp): Gram products of the inputs (fp32, half
// and bf16 values: exact in fp64) summed in fp64 per thread and per block; the combine
// sum_k c_k g_k formed in fp64 with fp64 coefficients and rounded once. Loads are 16 bytes
// wide where every pointer of the tensor is 16-byte aligned (chunks start at multiples of
// kChunk elements), with a scalar tail.
//
// K is a template parameter up to kRegK (the K(K+1)/2 pair sums of the Gram in registers);
// above it (K <= 32) the Gram stages a tile of the K rows in shared memory and each thread
// owns at most kJobs (pair, lane) sums, so no K-sized array lives in a thread.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "../precision.h"
#include "../weighting_args.h"
#include "weightings.h"

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxK = solve::kMaxK;  // 32
constexpr int kRegK = 8;             // templated register path for K <= kRegK
constexpr int kTile = 64;            // elements per row of the shared tile (K > kRegK)
constexpr int kJobs = 3;             // (pair, lane) sums per thread: ceil(32 * 33 / 2 / 256)
static_assert(kJobs * kThreads >= kMaxK * (kMaxK + 1) / 2, "kJobs too small for kMaxK");
static_assert(kJobs * kThreads <= kMaxK * (kTile + 1), "tiled-path reduction fits the tile");
// Blocks per SM that __launch_bounds__ asks for (65536 / (256 * blocks) registers a thread):
// the combine is bandwidth-bound and keeps 3 (<= 85 registers; unbounded, ptxas chose 48
// and spilled); the Gram's K(K+1)/2 register sums need up to ~210 registers from K = 5.
constexpr int kCombineBlocks = 3;
template <int KT> constexpr int kGramBlocks = KT >= 5 ? 1 : 2;
enum Dtype : int8_t { kF32, kF64, kBF16, kF16 };

// The launch's metadata, by value (kernel parameters are limited to 4 KB on the CUDA
// versions ATen supports; this leaves room for the other arguments).
constexpr int kPtrs = 320;
constexpr int kSlots = 48;
struct Batch {
  const void* ptr[kPtrs];      // slot s: its K inputs at s * (K + 1) + k, its output at s * (K + 1) + K
  int64_t numel[kSlots];
  int64_t base[kSlots];        // index of the tensor's first chunk in the partials
  int32_t block0[kSlots + 1];  // first block of each slot; block0[n] = the grid
  int32_t tensor[kSlots];
  int8_t dtype[kSlots];
  int32_t n;
};
static_assert(sizeof(Batch) <= 3900, "Batch must fit the 4 KB kernel-parameter limit with the other arguments");

__device__ __forceinline__ double to_d(float x) { return x; }
__device__ __forceinline__ double to_d(double x) { return x; }
__device__ __forceinline__ double to_d(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_d(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_d(double v);
template <> __device__ __forceinline__ float from_d<float>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ double from_d<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_d<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <> __device__ __forceinline__ __nv_bfloat16 from_d<__nv_bfloat16>(double v) {
  return __float2bfloat16(static_cast<float>(v));  // as the CPU (and for half): double -> float -> T
}
__device__ __forceinline__ bool finite(double x) { return x - x == 0; }

// 16 bytes of T: V = 16 / sizeof(T) elements, loaded and stored as one uint4.
template <class T> struct alignas(16) Pack {
  static constexpr int V = 16 / sizeof(T);
  T v[V];
};
template <class T> __device__ __forceinline__ Pack<T> load_pack(const T* p) {
  uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> r;
  memcpy(&r, &u, 16);
  return r;
}
template <class T> __device__ __forceinline__ void store_pack(T* p, const Pack<T>& r) {
  uint4 u;
  memcpy(&u, &r, 16);
  *reinterpret_cast<uint4*>(p) = u;
}

struct Where {
  int s;          // slot
  int64_t chunk;  // chunk index within the tensor
  int64_t start;  // first element
  int n;          // elements in this chunk
};

__device__ __forceinline__ Where locate(const Batch& bt) {
  int s = 0;
  while (static_cast<int32_t>(blockIdx.x) >= bt.block0[s + 1]) ++s;
  Where w;
  w.s = s;
  w.chunk = static_cast<int64_t>(blockIdx.x) - bt.block0[s];
  w.start = w.chunk * kChunk;
  const int64_t left = bt.numel[s] - w.start;
  w.n = static_cast<int>(left < kChunk ? left : kChunk);
  return w;
}

// After the block wrote its partial row: the last block of the tensor to finish adds the
// tensor's rows in chunk order into out[t * width ..]. Counters start at zero.
__device__ __forceinline__ void finish(const Batch& bt, const Where& at, int width, const double* partial,
                                       int* counters, double* out) {
  __shared__ bool last;
  __threadfence();  // this block's partial row is visible before the count says so
  __syncthreads();
  const int64_t chunks = (bt.numel[at.s] + kChunk - 1) / kChunk;
  const int t = bt.tensor[at.s];
  if (threadIdx.x == 0) last = atomicAdd(counters + t, 1) == chunks - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const double* rows = partial + bt.base[at.s] * width;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += __ldcg(rows + c * width + j);  // L2: other SMs' writes
    out[static_cast<int64_t>(t) * width + j] = s;
  }
}

// Sum of v over the warp, to lane 0.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------------------ Gram

template <int K>
__device__ __forceinline__ void add_pairs(const double (&x)[K], double (&acc)[K * (K + 1) / 2], bool& ok) {
  int idx = 0;
#pragma unroll
  for (int p = 0; p < K; ++p) {
    ok &= finite(x[p]);
#pragma unroll
    for (int q = 0; q <= p; ++q, ++idx) acc[idx] = fma(x[p], x[q], acc[idx]);
  }
}

// K <= kRegK: each thread keeps the K(K+1)/2 pair sums of its elements in registers.
template <int K, class T>
__device__ __forceinline__ void gram_reg(const Batch& bt, const Where& at, double* row, double* red) {
  constexpr int P = K * (K + 1) / 2, V = Pack<T>::V;
  const T* in[K];
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    in[k] = static_cast<const T*>(bt.ptr[at.s * (K + 1) + k]) + at.start;
    aligned &= reinterpret_cast<uintptr_t>(in[k]) % 16 == 0;
  }
  double acc[P];
#pragma unroll
  for (int j = 0; j < P; ++j) acc[j] = 0;
  bool ok = true;
  const int nv = aligned ? at.n / V : 0;
  for (int i = threadIdx.x; i < nv; i += kThreads) {
    Pack<T> pk[K];
#pragma unroll
    for (int k = 0; k < K; ++k) pk[k] = load_pack(in[k] + static_cast<int64_t>(i) * V);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      double x[K];
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = to_d(pk[k].v[e]);
      add_pairs<K>(x, acc, ok);
    }
  }
  for (int i = nv * V + threadIdx.x; i < at.n; i += kThreads) {
    double x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = to_d(in[k][i]);
    add_pairs<K>(x, acc, ok);
  }
  // block sums per pair: warps, then the warps' sums in order
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const double v = warp_sum(acc[j]);
    if (lane == 0) red[warp * P + j] = v;
  }
  const bool bad = __syncthreads_or(!ok);
  for (int j = threadIdx.x; j < P; j += kThreads) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w * P + j];
    int p = 0;
    while ((p + 1) * (p + 2) / 2 <= j) ++p;
    const int q = j - p * (p + 1) / 2;
    row[p * K + q] = s;
    row[q * K + p] = s;
  }
  if (threadIdx.x == 0) row[K * K] = bad ? 1.0 : 0.0;
}

// K > kRegK: tiles of kTile elements of the K rows in shared memory (fp64, exact); thread
// j owns jobs j, j + kThreads, ...: job = lane * P + pair, lanes E = max(1, kThreads / P)
// splitting the tile's elements. The lanes' sums of a pair are added in lane order.
template <class T>
__device__ __forceinline__ void gram_tiled(const Batch& bt, const Where& at, int K, double* row,
                                           double (*tile)[kTile + 1]) {
  constexpr int V = Pack<T>::V;
  const int P = K * (K + 1) / 2;
  const int E = P < kThreads ? kThreads / P : 1;
  const int jobs = P * E;
  int jp[kJobs], jq[kJobs], jl[kJobs];
  double acc[kJobs];
#pragma unroll
  for (int r = 0; r < kJobs; ++r) {
    const int job = threadIdx.x + r * kThreads;
    const int pair = job % P;
    int p = 0;
    while ((p + 1) * (p + 2) / 2 <= pair) ++p;
    jp[r] = p;
    jq[r] = pair - p * (p + 1) / 2;
    jl[r] = job < jobs ? job / P : kTile;  // kTile: no job
    acc[r] = 0;
  }
  const T* const* ptrs = reinterpret_cast<const T* const*>(bt.ptr + at.s * (K + 1));
  bool aligned = true;
  for (int k = 0; k < K; ++k) aligned &= reinterpret_cast<uintptr_t>(ptrs[k] + at.start) % 16 == 0;
  bool ok = true;
  for (int e0 = 0; e0 < at.n; e0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    if (aligned) {
      constexpr int per_row = kTile / V;
      for (int i = threadIdx.x; i < K * per_row; i += kThreads) {
        const int k = i / per_row, e = (i % per_row) * V;
        const T* src = ptrs[k] + at.start + e0 + e;
        if (e0 + e + V <= at.n) {
          const Pack<T> pk = load_pack(src);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const double x = to_d(pk.v[v]);
            ok &= finite(x);
            tile[k][e + v] = x;
          }
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const double x = e0 + e + v < at.n ? to_d(src[v]) : 0.0;
            ok &= finite(x);
            tile[k][e + v] = x;
          }
        }
      }
    } else {
      for (int i = threadIdx.x; i < K * kTile; i += kThreads) {
        const int k = i / kTile, e = i % kTile;
        const double x = e0 + e < at.n ? to_d(ptrs[k][at.start + e0 + e]) : 0.0;
        ok &= finite(x);
        tile[k][e] = x;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kJobs; ++r) {
      const double* a = tile[jp[r]];
      const double* b = tile[jq[r]];
      for (int e = jl[r]; e < kTile; e += E) acc[r] = fma(a[e], b[e], acc[r]);
    }
  }
  __syncthreads();
  double* red = &tile[0][0];
#pragma unroll
  for (int r = 0; r < kJobs; ++r) {
    const int job = threadIdx.x + r * kThreads;
    if (job < jobs) red[job] = acc[r];
  }
  const bool bad = __syncthreads_or(!ok);
  for (int j = threadIdx.x; j < P; j += kThreads) {
    double s = 0;
    for (int l = 0; l < E; ++l) s += red[l * P + j];
    int p = 0;
    while ((p + 1) * (p + 2) / 2 <= j) ++p;
    const int q = j - p * (p + 1) / 2;
    row[p * K + q] = s;
    row[q * K + p] = s;
  }
  if (threadIdx.x == 0) row[K * K] = bad ? 1.0 : 0.0;
}

// out [T, K * K + 1]: each tensor's Gram (row-major) and its non-finite flag (0 or 1).
template <int KT>
__global__ void __launch_bounds__(kThreads, kGramBlocks<KT>) gram_k_kernel(const Batch bt, int K, double* __restrict__ partial,
                                                          int* __restrict__ counters, double* __restrict__ out) {
  // K > kRegK: the tile; else the warps' pair sums (a smaller array: more blocks per SM)
  __shared__ double tile[KT > 0 ? 1 : kMaxK][KT > 0 ? KT * (KT + 1) / 2 * kWarps : kTile + 1];
  const Where at = locate(bt);
  const int width = K * K + 1;
  double* row = partial + (bt.base[at.s] + at.chunk) * width;
  if constexpr (KT > 0) {
    double* red = &tile[0][0];
    switch (bt.dtype[at.s]) {
      case kF64: gram_reg<KT, double>(bt, at, row, red); break;
      case kBF16: gram_reg<KT, __nv_bfloat16>(bt, at, row, red); break;
      case kF16: gram_reg<KT, __half>(bt, at, row, red); break;
      default: gram_reg<KT, float>(bt, at, row, red); break;
    }
  } else {
    auto* t = reinterpret_cast<double(*)[kTile + 1]>(&tile[0][0]);
    switch (bt.dtype[at.s]) {
      case kF64: gram_tiled<double>(bt, at, K, row, t); break;
      case kBF16: gram_tiled<__nv_bfloat16>(bt, at, K, row, t); break;
      case kF16: gram_tiled<__half>(bt, at, K, row, t); break;
      default: gram_tiled<float>(bt, at, K, row, t); break;
    }
  }
  finish(bt, at, width, partial, counters, out);
}

// ------------------------------------------------------------------------------ combine

// out = sum_k c_k g_k (fp64, rounded once); row[0] = this chunk's sum of squares of the
// fp64 values (as the CPU kernels). KT = 0: K at run time.
template <int KT, class T>
__device__ __forceinline__ void combine_body(const Batch& bt, const Where& at, int K, const double* c, double* row,
                                             double* red) {
  constexpr int V = Pack<T>::V;
  const int KK = KT > 0 ? KT : K;
  const T* const* in = reinterpret_cast<const T* const*>(bt.ptr + at.s * (KK + 1));
  T* out = static_cast<T*>(const_cast<void*>(bt.ptr[at.s * (KK + 1) + KK])) + at.start;
  bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int k = 0; k < KK; ++k) aligned &= reinterpret_cast<uintptr_t>(in[k] + at.start) % 16 == 0;
  double sq = 0;
  const int nv = aligned ? at.n / V : 0;
  for (int i = threadIdx.x; i < nv; i += kThreads) {
    double acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0;
#pragma unroll 8
    for (int k = 0; k < KK; ++k) {
      const Pack<T> pk = load_pack(in[k] + at.start + static_cast<int64_t>(i) * V);
      const double ck = c[k];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = fma(ck, to_d(pk.v[v]), acc[v]);
    }
    Pack<T> o;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      o.v[v] = from_d<T>(acc[v]);
      sq = fma(acc[v], acc[v], sq);
    }
    store_pack(out + static_cast<int64_t>(i) * V, o);
  }
  for (int i = nv * V + threadIdx.x; i < at.n; i += kThreads) {
    double acc = 0;
#pragma unroll 8
    for (int k = 0; k < KK; ++k) acc = fma(c[k], to_d(in[k][at.start + i]), acc);
    out[i] = from_d<T>(acc);
    sq = fma(acc, acc, sq);
  }
  sq = warp_sum(sq);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    row[0] = s;
  }
}

// coefs [T, K] float64 on the device; out [T]: each tensor's sum of squares.
template <int KT>
__global__ void __launch_bounds__(kThreads, kCombineBlocks) combine_k_kernel(const Batch bt, int K, const double* __restrict__ coefs,
                                                             double* __restrict__ partial, int* __restrict__ counters,
                                                             double* __restrict__ out) {
  __shared__ double c[kMaxK];
  __shared__ double red[kWarps];
  const Where at = locate(bt);
  const int t = bt.tensor[at.s];
  if (threadIdx.x < K) c[threadIdx.x] = coefs[static_cast<int64_t>(t) * K + threadIdx.x];
  __syncthreads();
  double* row = partial + bt.base[at.s] + at.chunk;
  switch (bt.dtype[at.s]) {
    case kF64: combine_body<KT, double>(bt, at, K, c, row, red); break;
    case kBF16: combine_body<KT, __nv_bfloat16>(bt, at, K, c, row, red); break;
    case kF16: combine_body<KT, __half>(bt, at, K, c, row, red); break;
    default: combine_body<KT, float>(bt, at, K, c, row, red); break;
  }
  finish(bt, at, 1, partial, counters, out);
}

// ------------------------------------------------------------------------------ host

int8_t dtype_code(c10::ScalarType s, const char* op, size_t i) {
  switch (s) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK_TYPE(false, op, ": grads[", i, "]: expected a floating dtype, got ", s);
  }
}

// T = the number of tensors, after checking K and the list's length.
int64_t check_k(const char* op, at::TensorList grads, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, op, ": K: expected 1..", kMaxK, " objectives, got ", K);
  TORCH_CHECK_VALUE(!grads.empty() && grads.size() % K == 0, op, ": grads: expected a positive multiple of K = ", K,
                    " tensors, got ", grads.size());
  return static_cast<int64_t>(grads.size()) / K;
}

// The tensors (checked), their chunks; launch(batch) once per full Batch.
template <class Launch>
int64_t for_batches(const char* op, at::TensorList grads, int64_t K, at::TensorList out, const Launch& launch) {
  const int64_t T = check_k(op, grads, K);
  TORCH_CHECK_VALUE(out.empty() || static_cast<int64_t>(out.size()) == T, op, ": out: expected ", T, " tensors, got ",
                    out.size());
  TORCH_CHECK_VALUE(T < (int64_t{1} << 31), op, ": too many tensors");
  const int slots = static_cast<int>(std::min<int64_t>(kSlots, kPtrs / (K + 1)));
  const at::Device dev = grads[0].device();
  Batch bt;
  bt.n = 0;
  bt.block0[0] = 0;
  int64_t chunks = 0;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& like = out.empty() ? grads[t * K] : out[t];
    TORCH_CHECK_VALUE(like.is_cuda() && like.device() == dev && like.is_contiguous(), op, ": out[", t,
                      "]: expected a contiguous tensor on ", dev);
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& g = grads[t * K + k];
      TORCH_CHECK_VALUE(g.is_cuda() && g.device() == dev && g.is_contiguous() && g.sizes() == like.sizes() &&
                            g.scalar_type() == like.scalar_type(),
                        op, ": grads[", t * K + k, "]: expected a contiguous ", like.scalar_type(), " tensor of shape ",
                        like.sizes(), " on ", dev);
    }
    const int64_t n = like.numel();
    const int64_t nch = (n + kChunk - 1) / kChunk;
    if (nch == 0) continue;  // its sums stay the zeros they start as
    TORCH_CHECK_VALUE(nch < (int64_t{1} << 30), op, ": tensor ", t, " too large");
    if (bt.n == slots || static_cast<int64_t>(bt.block0[bt.n]) + nch >= (int64_t{1} << 31)) {
      launch(bt);
      bt.n = 0;
    }
    const int s = bt.n;
    for (int64_t k = 0; k < K; ++k) bt.ptr[s * (K + 1) + k] = grads[t * K + k].data_ptr();
    bt.ptr[s * (K + 1) + K] = out.empty() ? nullptr : out[t].data_ptr();
    bt.numel[s] = n;
    bt.base[s] = chunks;
    bt.tensor[s] = static_cast<int32_t>(t);
    bt.dtype[s] = dtype_code(like.scalar_type(), op, t * K);
    bt.block0[s + 1] = static_cast<int32_t>((s == 0 ? 0 : bt.block0[s]) + nch);
    if (s == 0) bt.block0[0] = 0;
    bt.n = s + 1;
    chunks += nch;
  }
  if (bt.n) launch(bt);
  return chunks;
}

// Chunk count first (the partials' size), then the launches.
int64_t count_chunks(at::TensorList grads, int64_t K) {
  int64_t c = 0;
  const int64_t T = static_cast<int64_t>(grads.size()) / K;
  for (int64_t t = 0; t < T; ++t) c += (grads[t * K].numel() + kChunk - 1) / kChunk;
  return c;
}

#define MMFAST_K_CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

void launch_gram(const Batch& bt, int K, double* partial, int* counters, double* out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(bt.block0[bt.n]);
  switch (K) {
#define MMFAST_CASE(k) \
  case k: gram_k_kernel<k><<<grid, kThreads, 0, stream>>>(bt, K, partial, counters, out); break;
    MMFAST_K_CASES(MMFAST_CASE)
#undef MMFAST_CASE
    default: gram_k_kernel<0><<<grid, kThreads, 0, stream>>>(bt, K, partial, counters, out); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_combine(const Batch& bt, int K, const double* coefs, double* partial, int* counters, double* out,
                    cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(bt.block0[bt.n]);
  switch (K) {
#define MMFAST_CASE(k) \
  case k: combine_k_kernel<k><<<grid, kThreads, 0, stream>>>(bt, K, coefs, partial, counters, out); break;
    MMFAST_K_CASES(MMFAST_CASE)
#undef MMFAST_CASE
    default: combine_k_kernel<0><<<grid, kThreads, 0, stream>>>(bt, K, coefs, partial, counters, out); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Gram pass: (per-tensor Grams [T, K, K], non-finite flags [T]).
std::tuple<at::Tensor, at::Tensor> gram_pass(const char* op, at::TensorList grads, int64_t K) {
  const int64_t T = check_k(op, grads, K), width = K * K + 1;
  auto opts = grads[0].options();
  at::Tensor partial = at::empty({std::max<int64_t>(count_chunks(grads, K), 1), width}, opts.dtype(at::kDouble));
  at::Tensor counters = at::zeros({std::max<int64_t>(T, 1)}, opts.dtype(at::kInt));
  at::Tensor per = at::zeros({T, width}, opts.dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_batches(op, grads, K, {}, [&](const Batch& bt) {
    launch_gram(bt, static_cast<int>(K), partial.data_ptr<double>(), counters.data_ptr<int>(), per.data_ptr<double>(),
                stream);
  });
  return {per.narrow(1, 0, K * K).reshape({T, K, K}), per.select(1, K * K)};
}

// The combine pass: per-tensor sums of squares of the outputs [T].
at::Tensor combine_pass(const char* op, at::TensorList out, at::TensorList grads, int64_t K, const at::Tensor& coefs) {
  const int64_t T = check_k(op, grads, K);
  auto opts = grads[0].options();
  at::Tensor partial = at::empty({std::max<int64_t>(count_chunks(grads, K), 1)}, opts.dtype(at::kDouble));
  at::Tensor counters = at::zeros({std::max<int64_t>(T, 1)}, opts.dtype(at::kInt));
  at::Tensor sq = at::zeros({T}, opts.dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_batches(op, grads, K, out, [&](const Batch& bt) {
    launch_combine(bt, static_cast<int>(K), coefs.const_data_ptr<double>(), partial.data_ptr<double>(),
                   counters.data_ptr<int>(), sq.data_ptr<double>(), stream);
  });
  return sq;
}

void check_coefs(const char* op, const at::Tensor& coefs, int64_t T, int64_t K, at::Device dev) {
  TORCH_CHECK_VALUE(coefs.device() == dev && coefs.scalar_type() == at::kDouble && coefs.dim() == 2 &&
                        coefs.size(0) == T && coefs.size(1) == K,
                    op, ": coefs: expected a float64 tensor [", T, ", ", K, "] on ", dev, ", got ",
                    coefs.scalar_type(), " ", coefs.sizes(), " on ", coefs.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gram_k_cuda(at::TensorList grads, int64_t K) {
  check_k("mmfast::gram_k", grads, K);
  c10::cuda::CUDAGuard guard(grads[0].device());
  auto [per, bad] = gram_pass("mmfast::gram_k", grads, K);
  return {per.contiguous(), (bad == 0).all()};
}

at::Tensor combine_k_cuda(at::TensorList out, at::TensorList grads, int64_t K, const at::Tensor& coefs) {
  const char* op = "mmfast::combine_k_";
  const int64_t T = check_k(op, grads, K);
  c10::cuda::CUDAGuard guard(grads[0].device());
  check_coefs(op, coefs, T, K, grads[0].device());
  return combine_pass(op, out, grads, K, coefs.contiguous());
}

// aggregate_ in one call: the Gram pass (or the given per-tensor Grams), the weighting
// step (weightings.cu), the combine pass, the total norm; all queued, nothing read back.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_k_cuda(
    at::TensorList out, at::TensorList grads, int64_t K, const std::optional<at::Tensor>& per_tensor,
    const at::Tensor& layout, int64_t num_groups, const std::string& method, double c, double norm_eps,
    int64_t rescale, double reg_eps, double rcond, int64_t main, at::IntArrayRef orders, double eps,
    std::optional<double> gamma) {
  const char* op = "mmfast::aggregate_k_";
  const solve::Params prm = make_params(op, K, method, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps);
  const int64_t T = check_k(op, grads, K);
  const at::Device dev = grads[0].device();
  c10::cuda::CUDAGuard guard(dev);
  at::Tensor per, all_finite;
  if (per_tensor) {
    per = per_tensor->contiguous();
    TORCH_CHECK_VALUE(per.device() == dev && per.scalar_type() == at::kDouble && per.dim() == 3 && per.size(0) == T &&
                          per.size(1) == K && per.size(2) == K,
                      op, ": per_tensor: expected a float64 tensor [", T, ", ", K, ", ", K, "] on ", dev, ", got ",
                      per.scalar_type(), " ", per.sizes(), " on ", per.device());
    all_finite = at::isfinite(per).all();
  } else {
    auto [p, bad] = gram_pass(op, grads, K);
    per = p.contiguous();
    all_finite = (bad == 0).all();
  }
  check_layout(op, per, layout, num_groups);
  auto [gram, w, coefs] = aggregate_weights_on_device(per, layout, num_groups, prm, gamma);
  at::Tensor sq = combine_pass(op, out, grads, K, coefs);
  return {gram, w, sq.sum().sqrt(), all_finite};
}

}  // namespace mmfast::cuda

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("gram_k", &mmfast::cuda::gram_k_cuda);
  m.impl("combine_k_", &mmfast::cuda::combine_k_cuda);
  m.impl("aggregate_k_", &mmfast::cuda::aggregate_k_cuda);
}
