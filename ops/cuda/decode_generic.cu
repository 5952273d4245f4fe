// Decode path for everything decode_tc.cu does not take: fp32 (any bits), fp16 with bits 2 or 8,
// GPUs before sm_90, and fp16 when A (M x K) does not fit in shared memory. Correct for any K < 2^31,
// any N, M <= 8.
//
// Layout and launch: 256 threads = 8 warps; one warp per output row n (rows by grid stride, so any
// N works with a grid of a few CTAs per SM). Lanes stride over k: lane l handles k = l, l+32, ...,
// extracts code k from the tiled layout (sqllm/layout.h: one word, or three for the 3-bit codes
// spread over the planes), looks the value up in the row's LUT (global memory, L1-resident), and accumulates in fp32 for every row of
// A. A is staged once per CTA in shared memory (as T) when M * K * sizeof(T) <= 48 KiB, else read
// from global memory (L1/L2). The sparse part is fused: the same warp strides over the row's CSR
// entries and gathers A; no atomics, balanced per row. Warp-shuffle reduction, bias, one rounding.
//
// Why this is simple: fp32 decode is not a performance target (the benchmark is fp16), and every
// fp16 model with 3 or 4 bits and a realistic K takes the tensor-core kernel. This kernel is the
// reference-like fallback that must be right for every shape.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"
#include "sqllm/layout.h"

namespace sqllm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;
constexpr int64_t kStageBytes = 48 * 1024;  // no opt-in needed below this

template <typename T>
struct GenericParams {
  const T* a;
  const uint32_t* q;
  const T* lut;
  const int32_t* indptr;
  const int32_t* indices;
  const T* values;
  const T* bias;
  T* y;
  int64_t M, K, N, words;
  int bits;
  int stage;  // copy A into shared memory first
};

// (kThreads, 2): without a minimum, ptxas targets 64 registers on sm_86/89 and spills for half.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) DecodeGenericKernel(const GenericParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const T* a = p.a;
  if (p.stage) {
    T* staged = reinterpret_cast<T*>(smem);
    for (int64_t i = threadIdx.x; i < p.M * p.K; i += kThreads) staged[i] = p.a[i];
    __syncthreads();
    a = staged;
  }
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5); n < p.N; n += stride) {
    float acc[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) acc[m] = 0.f;
    const uint32_t* tile = p.q + (n >> 4) * p.words;
    const int r = static_cast<int>(n & 15);
    const T* lrow = p.lut + (n << p.bits);
    for (int64_t k = lane; k < p.K; k += 32) {
      const float w = ToFloat(lrow[layout::CodeAt(tile, r, k, p.K, p.bits)]);
      const T* ak = a + k;  // A[m, k] = ak[m * K], walked with one pointer
#pragma unroll
      for (int m = 0; m < 8; ++m, ak += p.K)
        if (m < p.M) acc[m] += w * ToFloat(*ak);
    }
    if (p.indptr) {
      const int64_t end = p.indptr[n + 1];
      for (int64_t e = p.indptr[n] + lane; e < end; e += 32) {
        const T* ak = a + p.indices[e];
        const float v = ToFloat(p.values[e]);
#pragma unroll
        for (int m = 0; m < 8; ++m, ak += p.K)
          if (m < p.M) acc[m] += v * ToFloat(*ak);
      }
    }
#pragma unroll
    for (int m = 0; m < 8; ++m)
      if (m < p.M) acc[m] = WarpSum(acc[m]);
    if (lane < p.M) {
      float x = 0.f;
#pragma unroll
      for (int m = 0; m < 8; ++m)
        if (m == lane) x = acc[m];
      if (p.bias) x += ToFloat(p.bias[n]);
      p.y[lane * p.N + n] = FromFloat<T>(x);
    }
  }
}

template <typename T>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, const DeviceInfo& dev) {
  GenericParams<T> g{};
  g.a = static_cast<const T*>(d.a);
  g.q = d.qweight;
  g.lut = static_cast<const T*>(d.lut);
  g.indptr = p.has_sparse ? d.indptr : nullptr;
  g.indices = d.indices;
  g.values = static_cast<const T*>(d.values);
  g.bias = p.has_bias ? static_cast<const T*>(d.bias) : nullptr;
  g.y = static_cast<T*>(d.y);
  g.M = p.M;
  g.K = p.K;
  g.N = p.N;
  g.words = p.words;
  g.bits = p.bits;
  const int64_t a_bytes = p.M * p.K * static_cast<int64_t>(sizeof(T));
  g.stage = a_bytes <= kStageBytes ? 1 : 0;
  const size_t smem = g.stage ? static_cast<size_t>(a_bytes) : 0;
  const int64_t ctas = std::min<int64_t>((p.N + kWarpsPerCta - 1) / kWarpsPerCta, static_cast<int64_t>(dev.sms) * 8);
  cudaError_t e = LaunchKernel(&DecodeGenericKernel<T>, dim3(static_cast<unsigned>(std::max<int64_t>(ctas, 1))),
                               dim3(kThreads), smem, stream, false, g);
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  return e == cudaSuccess ? "" : CudaMessage(e, "launching the decode (generic) kernel");
}

}  // namespace

std::string LaunchDecodeGeneric(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev) {
  if (p.M < 1 || p.M > 8) return "SqueezeMatMul (CUDA): internal error: generic decode kernel called with M > 8";
  return args.half ? Launch<__half>(p, args, stream, dev) : Launch<float>(p, args, stream, dev);
}

}  // namespace sqllm::cuda
